"""A real-behaving Mixture-of-Experts for the MoE benchmarks: the demo model upcycled.

SmolLM2-135M becomes a Mixtral with `--experts` experts (top `--top-k`) per layer: each expert
is that layer's MLP plus a little noise (so every expert is a distinct matrix), the router a
small random matrix. Every routing of the upcycled model computes about what the dense model
does, so it speaks like the demo model and its quality can be measured against itself.
`--family qwen2_moe`: a Qwen2-MoE instead (a second family: q/k/v biases, zero here; a shared
expert, the MLP itself, behind its sigmoid gate, zero so a half; the routed experts' top-k
weights normalised and their down projections halved, so that the two halves add up to the
MLP again).

  python bench/upcycle_moe.py out/smollm2-moe --experts 8 --top-k 2
  python bench/upcycle_moe.py out/smollm2-qwen2moe --family qwen2_moe

Then, e.g.: python bench/bench_vs_llmcompressor.py --model out/smollm2-moe --schemes W4A16
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def upcycle(dense, experts: int, top_k: int, noise: float, router_std: float, seed: int,
            family: str = "mixtral"):
    """A MixtralForCausalLM (or Qwen2MoeForCausalLM) whose experts are `dense`'s MLPs plus
    relative noise `noise`."""
    import transformers

    c = dense.config
    theta = getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]
    common = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        num_experts_per_tok=top_k, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id, hidden_act=c.hidden_act)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(**common, head_dim=getattr(c, "head_dim", None),
                                         rope_theta=theta, num_local_experts=experts)
        cls, down_scale = transformers.MixtralForCausalLM, 1.0
    elif family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(
            **common, rope_parameters={"rope_type": "default", "rope_theta": theta},
            num_experts=experts, moe_intermediate_size=c.intermediate_size,
            shared_expert_intermediate_size=c.intermediate_size, norm_topk_prob=True)
        cls, down_scale = transformers.Qwen2MoeForCausalLM, 0.5
    else:
        raise ValueError(f"family {family!r}: mixtral or qwen2_moe")
    with torch.device("meta"):
        moe = cls(cfg)
    moe = moe.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    sd = dense.state_dict()
    with torch.no_grad():
        own = moe.state_dict()
        for k, v in sd.items():                  # everything but the MLPs, as it was
            if k in own and own[k].shape == v.shape:
                own[k].copy_(v)
        for i, layer in enumerate(moe.model.layers):
            mlp = dense.model.layers[i].mlp
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).float()
            down = mlp.down_proj.weight.float() * down_scale
            ex = layer.mlp.experts
            for e in range(experts):
                ex.gate_up_proj[e] = gate_up + noise * gate_up.std() * torch.randn(
                    gate_up.shape, generator=gen)
                ex.down_proj[e] = down + noise * down.std() * torch.randn(down.shape,
                                                                          generator=gen)
            layer.mlp.gate.weight.copy_(router_std * torch.randn(layer.mlp.gate.weight.shape,
                                                                 generator=gen))
            shared = getattr(layer.mlp, "shared_expert", None)
            if shared is not None:          # the MLP itself, its gate sigmoid(0) = 1/2
                for n in ("gate_proj", "up_proj", "down_proj"):
                    getattr(shared, n).weight.copy_(getattr(mlp, n).weight)
                layer.mlp.shared_expert_gate.weight.zero_()
            attn = layer.self_attn
            for n in ("q_proj", "k_proj", "v_proj"):    # Qwen2-MoE's biases: none in Llama
                if getattr(attn, n).bias is not None:
                    getattr(attn, n).bias.zero_()
    for m in moe.modules():                      # rotary buffers left empty by to_empty
        if type(m).__name__.endswith("RotaryEmbedding"):
            fresh = type(m)(m.config)
            for name, buf in fresh.named_buffers():
                setattr(m, name, buf)
    moe.tie_weights()
    return moe.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.05, help="relative to each matrix's std")
    ap.add_argument("--router-std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", default="mixtral", choices=("mixtral", "qwen2_moe"))
    a = ap.parse_args(argv)
    from tritonpress import models
    dense, tok = models.load_model(models.model_path(a.model), dtype=torch.bfloat16)
    moe = upcycle(dense, a.experts, a.top_k, a.noise, a.router_std, a.seed, a.family)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = moe.generate(ids, max_new_tokens=12, do_sample=False)
        kl = torch.nn.functional.kl_div(moe(ids).logits.float().log_softmax(-1),
                                        dense(ids).logits.float().log_softmax(-1),
                                        log_target=True, reduction="batchmean")
    moe.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    print(f"{a.out}: {sum(p.numel() for p in moe.parameters()) / 1e6:.0f}M parameters; "
          f"KL to the dense model on one prompt {float(kl):.4f}; greedy: "
          f"{tok.decode(gen[0][ids.shape[1]:])!r}")


if __name__ == "__main__":
    main()
