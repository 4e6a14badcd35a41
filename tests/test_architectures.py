"""Beyond Llama: the decoder layers are found by one rule (loop/targets.find_decoder_layers),
so tiny OPT (model.decoder.layers) and GPT-NeoX (gpt_neox.layers, a fused query_key_value
Linear) compress with GPTQ to checkpoints transformers loads; what cannot be handled (GPT-2's
Conv1D, AWQ without its Llama-style mappings) is refused with the model's class and why."""
import pytest
import torch
import transformers as T

import tritonpress as tp
from tritonpress.checkpoint import load_dequantized
from tritonpress.loop.targets import find_decoder_layers
from tritonpress.folders import check_checkpoint_dir
from tritonpress.models import byte_tokenizer, check_has_linear_layers
from helpers import tiny_llama
from tritonpress.schemes import get_scheme

from test_distributed import write_text

TOK = byte_tokenizer()
IDS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}


def opt_config(**kw):
    return T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       word_embed_proj_dim=64, vocab_size=len(TOK), max_position_embeddings=256,
                       **IDS, **kw)


def neox_config(**kw):
    return T.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, vocab_size=len(TOK),
                           max_position_embeddings=256, **IDS, **kw)


CONFIGS = {"opt": opt_config, "gpt-neox": neox_config}


def tiny(arch, seed=0):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()
    model.tokenizer = TOK
    return model


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("calib") / "calib.txt")


def compress(model, scheme, out, text, recipe=None, **run):
    return tp.compress(model, scheme, str(out), recipe=recipe or [tp.GPTQ()],
                       calibration=tp.Calibration(dataset=text, num_samples=8, seq_len=64),
                       evaluation=None,
                       run=tp.Run(device="cpu", progress=False, overwrite=True, **run))


def logits(model):
    ids = TOK("the quick brown fox jumps over the lazy dog", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel_err(got, ref):
    return float((got - ref).norm() / ref.norm())


# ----------------------------------------------------------------------------- finding layers

def test_decoder_layers_are_found_by_one_rule():
    """The outermost ModuleList under the text decoder, as long as num_hidden_layers: the
    language model's layers, not a vision tower's; not MoE experts inside the layers."""
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    cases = {
        "model.layers": tiny_llama()[0],
        "model.decoder.layers": tiny("opt"),
        "gpt_neox.layers": tiny("gpt-neox"),
        "transformer.h": T.AutoModelForCausalLM.from_config(T.FalconConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)),
        "model.layers ": T.AutoModelForCausalLM.from_config(T.MixtralConfig(
            **small, num_local_experts=4)),
        "model.language_model.layers": T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(
            text_config=small, vision_config=dict(depth=3, embed_dim=32, hidden_size=32,
                                                  num_heads=4))),
    }
    for want, model in cases.items():
        layers, prefix = find_decoder_layers(model)
        assert prefix == want.strip() and len(layers) == 2, (type(model).__name__, prefix)
        check_has_linear_layers(model)


def test_what_cannot_be_handled_is_named_with_why():
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel: .*no nn\.Linear layers under "
                                         r"model\.transformer\.h \(1 GPT2Block holding Conv1D\)"):
        check_has_linear_layers(gpt2)
    with pytest.raises(ValueError, match="Sequential: .*no ModuleList of decoder blocks"):
        find_decoder_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM: .*model\.model\.layers \(it is "
                                         "empty\\)"):
        check_has_linear_layers(tiny_llama(layers=0)[0])


# ----------------------------------------------------------------------------- compressing

CASES = [(arch, scheme) for arch in CONFIGS for scheme in ("W4A16", "W8A8_FP8")]


@pytest.mark.parametrize("arch,scheme", CASES, ids=[f"{a}-{s}" for a, s in CASES])
def test_gptq_checkpoint_loads_with_logits_close(tmp_path, text, arch, scheme):
    model = tiny(arch)
    ref = logits(model)
    scheme_ = get_scheme(scheme, group_size=32) if scheme == "W4A16" else scheme
    report = compress(model, scheme_, tmp_path / "ckpt", text)
    layers, prefix = find_decoder_layers(model)       # every Linear of every layer, fused qkv too
    assert set(report["layers"]) == {f"{prefix}.{i}.{n}" for i, layer in enumerate(layers)
                                     for n, m in layer.named_modules()
                                     if isinstance(m, torch.nn.Linear)}
    assert all(info.get("method", "gptq") == "gptq" for info in report["layers"].values())
    check_checkpoint_dir(tmp_path / "ckpt")
    # transformers (with compressed-tensors) decompresses exactly the weights we computed with
    loaded, _, ignore = load_dequantized(tmp_path / "ckpt", dtype=torch.float32)
    theirs = dict(loaded.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(theirs[name], p), name
    assert rel_err(logits(loaded), ref) < (0.15 if scheme == "W4A16" else 0.06)
    assert any("lm_head" in i or "embed_out" in i for i in ignore)


@pytest.mark.parametrize("arch", CONFIGS)
def test_from_a_folder(tmp_path, text, arch):
    """From a saved folder, as users call it (streamed when the tensor names allow)."""
    model = tiny(arch)
    model.save_pretrained(tmp_path / "model")
    TOK.save_pretrained(tmp_path / "model")
    report = compress(tmp_path / "model", get_scheme("W4A16", group_size=32), tmp_path / "ckpt",
                      text)
    assert report["layers"]
    loaded, _, _ = load_dequantized(tmp_path / "ckpt", dtype=torch.float32)
    assert rel_err(logits(loaded), logits(model)) < 0.15


@pytest.mark.parametrize("arch,norm", [("opt", "self_attn_layer_norm"),
                                       ("gpt-neox", "input_layernorm")])
def test_smoothquant_pairs_their_layernorms(tmp_path, text, arch, norm):
    """SmoothQuant finds norm -> Linears by tensor identity: LayerNorms with a bias too."""
    model = tiny(arch)
    ref = logits(model)
    report = compress(model, "W8A8_INT8", tmp_path / "ckpt", text,
                      recipe=[tp.SmoothQuant(0.5), tp.GPTQ()])
    norms = {i["smoothquant"]["norm"].split(".")[-1] for i in report["layers"].values()
             if "smoothquant" in i}
    assert norm in norms
    loaded, _, _ = load_dequantized(tmp_path / "ckpt", dtype=torch.float32)
    assert rel_err(logits(loaded), ref) < 0.06


@pytest.mark.parametrize("arch", CONFIGS)
def test_awq_without_its_mappings_is_refused(arch):
    model = tiny(arch)
    with pytest.raises(ValueError, match=f"AWQ cannot run on {type(model).__name__}: .*"
                                         "input_layernorm -> q_proj/k_proj/v_proj.*GPTQ"):
        tp.AWQ().check_model(model, {})
    tp.AWQ().check_model(tiny_llama()[0], {})          # Llama: its mappings are there


# ----------------------------------------------------------------------------- resume

def test_resume_on_opt_counts_the_restored_layers(tmp_path, text):
    """An OPT run cut at layer 1 resumes layer 0 (ResumeState.resumed) and gives the same
    weights as an uninterrupted run."""
    from tritonpress.data import calibration_batches
    from tritonpress.loop.resume import ResumeState, fingerprint, resumable
    from tritonpress.loop.sequential import compress_sequential, recipe_fn

    scheme = get_scheme("W4A16", group_size=32)
    batches = calibration_batches(TOK, text, 8, 64)
    full = compress_sequential(tiny("opt"), batches, scheme, recipe_fn([tp.GPTQ()]),
                               device="cpu", progress=False)
    fp = fingerprint(tiny("opt"), scheme, batches, {"recipe": "gptq"})

    def cut_at_1(layer_idx, *a):
        if layer_idx == 1:
            raise KeyboardInterrupt
        return recipe_fn([tp.GPTQ()])(layer_idx, *a)

    first = ResumeState(tmp_path / "state", fp)
    with pytest.raises(KeyboardInterrupt):
        compress_sequential(tiny("opt"), batches, scheme, resumable(cut_at_1, first),
                            device="cpu", progress=False)
    assert first.resumed == []
    again = ResumeState(tmp_path / "state", fp)
    res = compress_sequential(tiny("opt"), batches, scheme,
                              resumable(recipe_fn([tp.GPTQ()]), again), device="cpu",
                              progress=False)
    assert again.resumed == [0]
    assert res.qweights.keys() == full.qweights.keys()
    for name, qw in full.qweights.items():
        assert torch.equal(res.qweights[name].dequantize(), qw.dequantize()), name
