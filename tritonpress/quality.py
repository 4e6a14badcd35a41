"""Quality of a (compressed) model on held-out windows: perplexity, and KL to the original.

  ppl = exp(mean over windows and positions t of -log p(x[t+1] | x[:t+1]))
  kl  = mean over the same positions of KL(p_ref || p_model)
      = sum_v p_ref(v) * (log p_ref(v) - log p_model(v))

KL needs the original model's next-token distributions: `reference()` runs it once and keeps
its log-probs on the CPU (fp16: 16 windows x 511 x 49152 vocab = 0.8 GB for SmolLM2).
W8A8 schemes also quantize each Linear's input per token at inference: `act_args` simulates
that (quantize -> dequantize the input) so the numbers match what vLLM would compute.

`act_sim` picks the rounding convention of that simulation:
  "vllm" (default)      what vLLM's kernels do. int8 (dynamic_scaled_int8_quant):
                        scale = absmax / 127, q = round_half_even(x * (127 / absmax)) saturated
                        to int8 (so in [-127, 127]); an all-zero row gives q = 0, scale 0.
                        fp8 (dynamic_per_token_scaled_fp8_quant): scale = max(absmax / 448,
                        1 / (448 * 512)), q = e4m3(clamp(x / scale, -448, 448)).
  "compressed-tensors"  its fake quantization (kernels.quant.quantize_per_token_ref): scale =
                        absmax / ((qmax - qmin) / 2), i.e. absmax / 127.5 for int8 (the largest
                        value rounds to 128 and is clamped to 127) and absmax / 448 for fp8.
Both are kernels.quant.quantize_per_token(x, args, act_sim), the rounding the runtime's GEMMs
use too (runtime.load_compressed, vLLM's by default).

The newer schemes quantize activations in groups along the features (fake_quant_activations):
  FP8_BLOCK  fp8 per token and group of 128, dynamic (kernels.fp8_block.quantize_fp8_groups:
             "vllm" scale = max(amax, 1e-10) / 448 as per_token_group_quant_fp8, else amax / 448)
  NVFP4      e2m1 in groups of 16, each group's e4m3 scale from its values under the Linear's
             static input_global_scale (calibrated; the module attribute), as compressed-tensors
             and vLLM's scaled_fp4_quant compute them (kernels.fp4.fake_quantize_fp4_ref)
  MXFP4      e2m1 in groups of 32 with dynamic e8m0 scales (the same function)
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import fp4
from .kernels.quant import FP8_MAX, check_act_sim, quantize_per_token
from .schemes import QuantArgs
from .schemes import matches


@dataclass
class Ref:
    """The uncompressed model's next-token log-probs, one [seq_len - 1, vocab] per window."""
    logprobs: list[torch.Tensor]
    ppl: float


def _as_windows(windows) -> torch.Tensor:
    """Accept a [n, L] LongTensor, a list of 1-D tensors, or a list of {input_ids} batches."""
    if isinstance(windows, torch.Tensor):
        x = windows
    elif windows and isinstance(windows[0], dict):
        x = torch.cat([b["input_ids"] for b in windows])
    else:
        x = torch.stack(list(windows)) if len(windows) else torch.empty(0, 0, dtype=torch.long)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] < 2:
        raise ValueError(f"windows must be [num_windows, seq_len >= 2] token ids, got {tuple(x.shape)}")
    return x.long()


def _check_fits(model: nn.Module, x: torch.Tensor) -> None:
    vocab = model.get_output_embeddings().weight.shape[0]
    if int(x.max()) >= vocab or int(x.min()) < 0:
        raise ValueError(f"token ids span [{int(x.min())}, {int(x.max())}] but the model's vocab "
                         f"is {vocab}: were the windows made with this model's tokenizer?")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and x.shape[1] > max_pos:
        raise ValueError(f"windows of {x.shape[1]} tokens exceed the model's "
                         f"max_position_embeddings ({max_pos}): use shorter windows")


def _logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[L - 1, vocab] fp32 log-probs of the next token at positions 0..L-2."""
    device = model.get_output_embeddings().weight.device
    logits = model(input_ids=ids.unsqueeze(0).to(device), use_cache=False).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1)


def _windows_iter(x: torch.Tensor, progress: bool, desc: str):
    if not progress:
        return x
    from tqdm.auto import tqdm
    return tqdm(x, desc=desc, leave=False)


@torch.no_grad()
def reference(model: nn.Module, windows, dtype: torch.dtype = torch.float16,
              progress: bool = False) -> Ref:
    """Run the uncompressed model once; keep its log-probs (in `dtype`, on the CPU)."""
    x = _as_windows(windows)
    _check_fits(model, x)
    logprobs, nll, count = [], 0.0, 0
    for ids in _windows_iter(x, progress, "reference"):
        lp = _logprobs(model, ids)
        nll -= lp.gather(-1, ids[1:].to(lp.device).unsqueeze(-1)).sum().item()
        count += len(ids) - 1
        logprobs.append(lp.to("cpu", dtype))
    return Ref(logprobs, math.exp(nll / count))


@torch.no_grad()
def evaluate(model: nn.Module, windows, ref: Ref | None = None, act_args: QuantArgs | None = None,
             ignore: tuple[str, ...] | list[str] = (), progress: bool = True,
             act_sim: str = "vllm") -> dict:
    """{"ppl", "nll", "kl" (None without ref), "tokens"} of `model` on the windows, with
    `act_args` activations simulated by the `act_sim` convention (see the module docstring)."""
    x = _as_windows(windows)
    _check_fits(model, x)
    if ref is not None and (len(ref.logprobs) != len(x) or ref.logprobs[0].shape[0] != x.shape[1] - 1):
        raise ValueError(f"ref was computed on {len(ref.logprobs)} windows of "
                         f"{ref.logprobs[0].shape[0] + 1} tokens, not on these {tuple(x.shape)}")
    nll, kl, count = 0.0, 0.0, 0
    check_act_sim(act_sim)
    sim = (simulate_activation_quant(model, act_args, ignore, act_sim) if act_args
           else contextlib.nullcontext())
    with sim:
        for i, ids in enumerate(_windows_iter(x, progress, "evaluate")):
            lp = _logprobs(model, ids)
            nll -= lp.gather(-1, ids[1:].to(lp.device).unsqueeze(-1)).sum().item()
            if ref is not None:
                kl += _kl(ref.logprobs[i], lp)
            count += len(ids) - 1
    return {"ppl": math.exp(nll / count), "nll": nll / count,
            "kl": kl / count if ref is not None else None, "tokens": count}


def _kl(lp_ref: torch.Tensor, lp: torch.Tensor) -> float:
    """sum over positions of KL(p_ref || p) from log-probs [positions, vocab]; lp_ref is
    renormalised first: rounding it to fp16 leaves sum(p_ref) != 1, which biases KL to first
    order; a proper distribution keeps the error second order."""
    lp_ref = F.log_softmax(lp_ref.to(lp.device, torch.float32), dim=-1)
    return (lp_ref.exp() * (lp_ref - lp)).sum().item()


# ----------------------------------------------------------------------------- activations

def describe_act_sim(act_args: QuantArgs | None, act_sim: str) -> str | None:
    """One line for the report: how the activations were quantized when KL was measured."""
    if act_args is None:
        return None
    if act_args.is_fp4:
        how = ("e4m3 group scales under the calibrated static global scale"
               if act_args.dynamic == "local" else "dynamic e8m0 (power-of-two) group scales")
        # vLLM's kernel multiplies by approximate reciprocals (rcp.approx) where
        # compressed-tensors divides: the same values but where a quotient lands within an ulp
        # of a rounding threshold, which no CPU rounding reproduces
        return (f"fp4 e2m1 in groups of {act_args.group_size}, {how}, as compressed-tensors "
                "computes them (vLLM's kernel: to an ulp)")
    if act_args.strategy == "group":
        div = "max(absmax, 1e-10) / 448" if act_sim == "vllm" else "absmax / 448"
        return (f"{act_sim}: fp8 per token and group of {act_args.group_size} features "
                f"(scale = {div})")
    kind = f"{act_args.type}{act_args.num_bits} per token"
    if act_args.type == "float":
        div = FP8_MAX
    else:
        div = act_args.qmax if act_sim == "vllm" else (act_args.qmax - act_args.qmin) / 2
    who = "vLLM runs it" if act_sim == "vllm" else "compressed-tensors fake-quantizes it"
    return f"{act_sim}: {kind} simulated as {who} (scale = absmax / {div:g})"


def vllm_cpu_note(scheme) -> str | None:
    """What vLLM's CPU build does with this scheme's checkpoint beyond what the KL simulates
    (vLLM 0.32, docs/vllm.md), or None."""
    w = scheme.weights
    if w.type == "int" and w.num_bits == 4 and scheme.input_activations is None:
        return ("vLLM's CPU build runs 4-bit checkpoints as W4A8 (activations quantized to "
                "int8 per token) by default on CPUs with AMX (VLLM_CPU_INT4_W4A8=0 keeps A16, "
                "as measured here); without AMX it runs A16")
    if w.type == "float" and scheme.input_activations is not None:
        return ("vLLM's CPU build runs FP8 fast only with AMX and AMX-FP8; elsewhere through "
                "torch._scaled_mm (slow); the values are the same")
    return None


def fake_quant_activations(x: torch.Tensor, args: QuantArgs, act_sim: str = "vllm",
                           global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x quantized and dequantized as the scheme's input_activations say (module docstring):
    per token, per token and group (fp8), or in fp4 groups (global_scale: NVFP4's static one)."""
    if args.is_fp4:
        if args.dynamic == "local" and global_scale is None:
            raise ValueError("NVFP4 activations need the Linear's calibrated input_global_scale "
                             "(a checkpoint's <name>.input_global_scale)")
        return fp4.fake_quantize_fp4_ref(x, args, global_scale if args.dynamic == "local"
                                         else None)
    if args.strategy == "group":
        from .kernels.fp8_block import quantize_fp8_groups
        q, scale = quantize_fp8_groups(x, args.group_size, act_sim)
        g = q.float().unflatten(-1, (-1, args.group_size)) * scale.unsqueeze(-1)
        return g.flatten(-2).to(x.dtype)
    return fake_quant_per_token(x, args, act_sim)


def fake_quant_per_token(x: torch.Tensor, args: QuantArgs, act_sim: str = "vllm") -> torch.Tensor:
    """Quantize each token's (row's) values with its own scale, then dequantize: x_hat (the
    rounding the runtime's GEMMs use too, kernels.quant.quantize_per_token)."""
    q, scale = quantize_per_token(x, args, act_sim)
    return (q.float() * scale).to(x.dtype)


@contextlib.contextmanager
def simulate_activation_quant(model: nn.Module, act_args: QuantArgs,
                              ignore: tuple[str, ...] | list[str] = (), act_sim: str = "vllm",
                              prefix: str = ""):
    """Within the block, every nn.Linear but lm_head and those in `ignore` sees its input
    quantized per token by the `act_sim` convention (yields how many Linears are hooked).
    `model` may be one decoder layer, `prefix` its full name (for the ignore patterns)."""
    check_act_sim(act_sim)
    if act_args.strategy not in ("token", "group", "tensor_group") or not act_args.dynamic:
        raise ValueError(f"activation quantization is simulated dynamically per token or per "
                         f"group; got strategy {act_args.strategy!r}, dynamic={act_args.dynamic}")
    if not act_args.symmetric:
        raise ValueError("dynamic activations are symmetric; asymmetric ones are not "
                         "supported by the W8A8 kernels either")

    def hook(module, inputs):
        g = getattr(module, "input_global_scale", None)
        return (fake_quant_activations(inputs[0], act_args, act_sim, g), *inputs[1:])

    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    pre = f"{prefix}." if prefix else ""
    handles = [m.register_forward_pre_hook(hook) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and m is not lm_head
               and not matches(pre + name, ignore)]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- layer by layer

class LayerwiseEval:
    """The quality evaluation of a streamed model (stream.py), which never holds more than one
    decoder layer: the held-out windows' hidden states go through each layer twice as it
    streams by, through the original weights (before(), the reference) and through the
    compressed ones with the activation quantization simulated (after()); result() then runs
    the final norm and lm_head on both and scores them as evaluate() does. The model must have
    its non-layer tensors loaded (Stream.load_rest)."""

    def __init__(self, model: nn.Module, window_sets: dict[str, torch.Tensor], device,
                 act_args: QuantArgs | None = None, ignore=(), act_sim: str = "vllm"):
        from .loop.activations import LayerInputs, capture_layer_inputs

        check_act_sim(act_sim)
        self.model, self.device = model, torch.device(device)
        self.act_args, self.ignore, self.act_sim = act_args, tuple(ignore), act_sim
        self.windows, self.kwargs, self.ref, self.cmp = {}, {}, {}, {}
        cpu = torch.device("cpu")
        for src, w in window_sets.items():
            x = _as_windows(w)
            _check_fits(model, x)
            hidden, kwargs, masks = capture_layer_inputs(model, list(x.unsqueeze(1)),
                                                         self.device, cpu)
            self.windows[src], self.kwargs[src] = x, kwargs
            self.ref[src] = self.cmp[src] = LayerInputs(hidden, kwargs[0], masks, self.device, cpu)

    @torch.no_grad()
    def before(self, i: int, layer: nn.Module) -> None:
        layer.to(self.device)
        for src in self.ref:
            out = self.ref[src].run(layer, label="eval")
            self.ref[src] = self.ref[src].with_hidden(out, self._kw(src, i))

    @torch.no_grad()
    def after(self, i: int, layer: nn.Module, prefix: str) -> None:
        sim = (simulate_activation_quant(layer, self.act_args, self.ignore, self.act_sim, prefix)
               if self.act_args else contextlib.nullcontext())
        with sim:
            for src in self.cmp:
                out = self.cmp[src].run(layer, label="eval")
                self.cmp[src] = self.cmp[src].with_hidden(out, self._kw(src, i))

    def _kw(self, src: str, i: int):
        kw = self.kwargs[src]
        return kw[i + 1] if i + 1 < len(kw) else kw[i]

    @torch.no_grad()
    def result(self, progress: bool = False) -> dict:
        """{source: {"ppl_before", "ppl", "kl"}} as compress() reports them."""
        out = {}
        for src, x in self.windows.items():
            nll_ref = nll = kl = 0.0
            count = 0
            for j, ids in enumerate(_windows_iter(x, progress, f"evaluate {src}")):
                lp_ref = _logprobs_from(self.model, ids, self.ref[src].hidden[j])
                lp = _logprobs_from(self.model, ids, self.cmp[src].hidden[j])
                tgt = ids[1:].to(lp.device).unsqueeze(-1)
                nll_ref -= lp_ref.gather(-1, tgt).sum().item()
                nll -= lp.gather(-1, tgt).sum().item()
                kl += _kl(lp_ref.to(torch.float16), lp)    # the reference as evaluate() keeps it
                count += len(ids) - 1
            out[src] = {"ppl_before": math.exp(nll_ref / count), "ppl": math.exp(nll / count),
                        "kl": kl / count}
        return out


class _Replay(nn.Module):
    """Stands in for decoder layer 0 (the others pass through): returns the final hidden
    states computed layer by layer, so the model's own forward applies its final norm, lm_head
    and any logit soft-capping."""

    def __init__(self, hidden: torch.Tensor | None):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.hidden is None else self.hidden.to(hidden_states)


def _logprobs_from(model: nn.Module, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    from .loop.targets import find_decoder_layers
    layers, _ = find_decoder_layers(model)
    originals = list(layers)
    for i in range(len(layers)):
        layers[i] = _Replay(hidden if i == 0 else None)
    try:
        return _logprobs(model, ids)
    finally:
        for i in range(len(layers)):
            layers[i] = originals[i]
