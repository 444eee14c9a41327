#!/usr/bin/env python3
"""Build small random-weight LFM2-Audio checkpoints and record the reference outputs.

The reference implementation is the PyPI package `liquid-audio` (see requirements.txt). Every
expected number written here comes from running it on CPU in float32; nothing is computed by
hand. Rerunning the script rewrites byte-identical files (all randomness is seeded per tensor).

Stages (run all by default, or pick with --only):

    tokenizer   tests/fixtures/tokenizer/{cases.json, fixture-tokenizer.json, fixture-cases.json}
    models      tests/fixtures/<name>/model/{config.json, model.safetensors, tokenizer*.json, ...}
    text        tests/fixtures/<name>/reference.{json,safetensors}  (prefill + greedy text decode)

Usage:

    .venv-ref/bin/python tools/reference/make_fixtures.py [--only STAGE[,STAGE]] [--models tiny-a,tiny-b]

The real LFM2 tokenizer is read from assets/lfm2-tokenizer.json (written by fetch_tokenizer.py,
which is run automatically when the file is missing).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures"
DEFAULT_TOKENIZER = REPO_ROOT / "assets" / "lfm2-tokenizer.json"

FIXTURE_VOCAB = 2048  # fixture tokenizer keeps ids < FIXTURE_VOCAB; fixture models use this vocab
N_GREEDY = 30
PREFIX_CUT = 5  # prefill_prefix covers the first L - PREFIX_CUT prompt positions
SYSTEM_PROMPT = "You are a helpful assistant."
USER_PROMPT = "Tell me about the weather today, please."


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    out = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(out, str(path), metadata=metadata)


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """Independent, order-free RNG stream for one named tensor."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


# --------------------------------------------------------------------------------------------
# stage: tokenizer
# --------------------------------------------------------------------------------------------

TOKENIZER_TEXTS: list[str] = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Tell me about the weather today, please.",
    "What's up? I'm fine; you're late, they'll see - we'd go.",
    "1 12 123 1234 12345 1234567",
    "Pi is 3.14159, e is 2.71828 and 1/3 = 0.333...",
    "two  spaces,   three,    four",
    "   leading and trailing   ",
    " single leading space",
    "line one\nline two\n\nline four",
    "windows\r\nline\r\nendings\r\n",
    "tab\tseparated\tvalues\t\tend",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber se\u00f1or",
    "Der Stra\u00dfenverkehr in M\u00fcnchen ist heute \u00e4u\u00dferst dicht.",
    "C'est l'\u00e9t\u00e9 ; o\u00f9 est la biblioth\u00e8que ? \u00c0 gauche !",
    "\u4eca\u5929\u5929\u6c14\u600e\u4e48\u6837\uff1f\u6211\u4eec\u53bb\u516c\u56ed\u5427\u3002",
    "\u4eca\u65e5\u306f\u3044\u3044\u5929\u6c17\u3067\u3059\u306d\u3002\u30c6\u30ec\u30d3\u3092\u898b\u307e\u3059\u3002",
    "Emoji: \U0001f600\U0001f44d\U0001f3fd \U0001f1e9\U0001f1ea \u2764\ufe0f \U0001f468\u200d\U0001f469\u200d\U0001f467",
    "def f(x):\n    return x ** 2  # square\n",
    'fn main() { println!("{}", vec![1, 2, 3].len()); }',
    "<|im_start|>user\nHi there<|im_end|>\n",
    "<|startoftext|><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    "<|audio_start|>",
    "text<|text_end|>more",
    "<|tool_call_start|>[get_weather(city='Paris')]<|tool_call_end|>",
    "<|im_start|>assistant\n",
    "",
    " ",
    "\n",
    "naive <|im_end|> inline and <|pad|> tokens",
    "\u00a9 2025 \u2014 \u201cquotes\u201d \u2018single\u2019 \u2026 \u20ac100 \u00b15\u00b0C",
    "ALL CAPS and MiXeD cAsE words",
    "import python; Mathias wrote pythonic code in Python",
    "<|cot_start|>think<|cot_end|><|file_start|>a.txt<|file_end|>",
]


def build_fixture_tokenizer(real: dict) -> dict:
    """Cut the real tokenizer down to ids < FIXTURE_VOCAB."""
    doc = copy.deepcopy(real)
    model = doc["model"]
    vocab = {tok: i for tok, i in model["vocab"].items() if i < FIXTURE_VOCAB}
    merges = []
    for m in model["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if a in vocab and b in vocab and (a + b) in vocab:
            merges.append(m)
    model["vocab"] = vocab
    model["merges"] = merges
    # The real file also has a few added tokens with high ids (64011 "Mathias", 64014 "python",
    # 64394..64399 <|cot_start|>..<|file_end|>); they cannot be kept and are dropped.
    doc["added_tokens"] = [t for t in doc["added_tokens"] if t["id"] < FIXTURE_VOCAB]
    # Every byte-level symbol must survive, so that any text is representable.
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    missing = [c for c in alphabet if c not in vocab]
    if len(alphabet) != 256 or missing:
        raise ValueError(f"byte-level symbols missing from the fixture vocab: {missing[:10]}")
    return doc


def stage_tokenizer(args: argparse.Namespace) -> None:
    from tokenizers import Tokenizer

    real_path = args.tokenizer
    real_tok = Tokenizer.from_file(str(real_path))
    out_dir = args.out / "tokenizer"

    def cases_for(tok: Tokenizer) -> list[dict]:
        cases = []
        for text in TOKENIZER_TEXTS:
            ids = tok.encode(text, add_special_tokens=False).ids
            cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
        return cases

    write_json(out_dir / "cases.json", cases_for(real_tok))

    real_doc = json.loads(real_path.read_text(encoding="utf-8"))
    fixture_doc = build_fixture_tokenizer(real_doc)
    fixture_path = out_dir / "fixture-tokenizer.json"
    write_json(fixture_path, fixture_doc)

    fixture_tok = Tokenizer.from_file(str(fixture_path))
    # Any text must encode to ids inside the fixture vocab and decode back unchanged
    # (special tokens aside, decode is lossless for byte-level BPE).
    g = torch.Generator().manual_seed(1234)
    probes = list(TOKENIZER_TEXTS)
    for _ in range(50):
        raw = bytes(torch.randint(0, 256, (64,), generator=g).tolist())
        probes.append(raw.decode("utf-8", errors="replace"))
    probes.append("".join(chr(c) for c in range(1, 0x250)))
    for text in probes:
        ids = fixture_tok.encode(text, add_special_tokens=False).ids
        assert all(0 <= i < FIXTURE_VOCAB for i in ids), text
        if "<|" not in text:
            assert fixture_tok.decode(ids, skip_special_tokens=False) == text, repr(text)
    write_json(out_dir / "fixture-cases.json", cases_for(fixture_tok))
    log(
        f"tokenizer: {len(TOKENIZER_TEXTS)} cases; fixture vocab {len(fixture_doc['model']['vocab'])} "
        f"entries, {len(fixture_doc['model']['merges'])} merges, {len(fixture_doc['added_tokens'])} added tokens"
    )


# --------------------------------------------------------------------------------------------
# fixture model definitions
# --------------------------------------------------------------------------------------------

PREPROCESSOR = {
    "sample_rate": 16000,
    "normalize": "per_feature",
    "window_size": 0.025,
    "window_stride": 0.01,
    "window": "hann",
    "features": 128,
    "n_fft": 512,
    "log": True,
    "frame_splicing": 1,
    "dither": 1e-05,
    "pad_to": 0,
    "pad_value": 0.0,
}


def encoder_config(d_model: int, n_heads: int, channels: int, n_layers: int = 2, kernel: int = 9) -> dict:
    return {
        "feat_in": 128,
        "feat_out": -1,
        "n_layers": n_layers,
        "d_model": d_model,
        "subsampling": "dw_striding",
        "subsampling_factor": 8,
        "subsampling_conv_channels": channels,
        "causal_downsampling": False,
        "reduction": None,
        "reduction_position": None,
        "reduction_factor": 1,
        "ff_expansion_factor": 4,
        "self_attention_model": "rel_pos",
        "n_heads": n_heads,
        "att_context_size": [-1, -1],
        "xscaling": False,
        "untie_biases": True,
        "pos_emb_max_len": 5000,
        "conv_kernel_size": kernel,
        "conv_norm_type": "batch_norm",
        "conv_context_size": None,
        "dropout": 0.1,
        "dropout_pre_encoder": 0.1,
        "dropout_emb": 0.0,
        "dropout_att": 0.1,
    }


@dataclass
class FixtureSpec:
    name: str
    config: dict
    seed: int
    # storage dtype for a state-dict key (integer tensors are always stored as they are)
    storage_dtype: Callable[[str], torch.dtype]
    # gains applied on top of the 1/sqrt(fan_in) init of the backbone's output projections
    op_gain: float = 3.0
    ffn_gain: float = 3.0
    notes: list[str] = field(default_factory=list)
    # extra gains for single rows of a tensor (applied after the random draw, before storage):
    # {state-dict key: {row index: gain}}; used to make a fixture emit given tokens
    row_gains: dict[str, dict[int, float]] = field(default_factory=dict)
    # which recording stages apply to this fixture
    text_fixture: bool = True
    asr_fixture: bool = True
    # LFM2.5-style audio_detokenizer/ (config.json content) and a small Mimi (constructor kwargs)
    detokenizer: dict | None = None
    mimi: dict | None = None


def _base_config(lfm: dict, encoder: dict, depthformer: dict, *, n_text: int, n_audio: int, tie_audio: bool) -> dict:
    return {
        "architectures": ["Lfm2AudioForConditionalGeneration"],
        "codebooks": 8,
        "tie_audio_embeddings": tie_audio,
        "semantic_codebook_factor": 100,
        "codebook_weight": "log",
        "interleaved_n_text": n_text,
        "interleaved_n_audio": n_audio,
        "preprocessor": dict(PREPROCESSOR),
        "encoder": encoder,
        "lfm": lfm,
        "depthformer": depthformer,
    }


def fixture_specs() -> dict[str, FixtureSpec]:
    # tiny-a: original LFM2 key spellings (block_ff_dim + auto adjust, full_attn_idxs, rope_theta).
    lfm_a = {
        "model_type": "lfm2",
        "vocab_size": FIXTURE_VOCAB,
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "block_ff_dim": 200,  # auto adjust: int(2*200/3)=133 -> round up to 32 -> 160
        "block_auto_adjust_ff_dim": True,
        "block_ffn_dim_multiplier": 1.0,
        "block_multiple_of": 32,
        "full_attn_idxs": [1, 4],
        "rope_theta": 1000000.0,
        "conv_L_cache": 3,
        "conv_bias": False,
        "norm_eps": 1e-05,
        "max_position_embeddings": 128000,
        "tie_embedding": True,
        "use_cache": True,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 7,
        "pad_token_id": 0,
    }
    cfg_a = _base_config(
        lfm_a,
        encoder_config(d_model=64, n_heads=4, channels=16),
        {"layers": 2, "dim": 64, "tie": True},
        n_text=6,
        n_audio=12,
        tie_audio=True,
    )
    # tiny-b: newer key spellings (intermediate_size, layer_types, rope_parameters).
    lfm_b = {
        "model_type": "lfm2",
        "vocab_size": FIXTURE_VOCAB,
        "hidden_size": 96,
        "num_hidden_layers": 5,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "intermediate_size": 224,  # used as is: block_auto_adjust_ff_dim is false
        "block_auto_adjust_ff_dim": False,
        "block_ffn_dim_multiplier": 1.0,
        "block_multiple_of": 256,
        "layer_types": ["full_attention", "conv", "full_attention", "full_attention", "conv"],
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "conv_L_cache": 3,
        "conv_bias": False,
        "norm_eps": 1e-05,
        "max_position_embeddings": 128000,
        "tie_word_embeddings": True,
        "use_cache": True,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 7,
        "pad_token_id": 0,
    }
    cfg_b = _base_config(
        lfm_b,
        encoder_config(d_model=48, n_heads=4, channels=8),
        {"layers": 2, "dim": 64, "tie": False},
        n_text=6,
        n_audio=9,
        tie_audio=True,
    )
    return {
        "tiny-a": FixtureSpec(
            name="tiny-a",
            config=cfg_a,
            seed=101,
            storage_dtype=lambda k: torch.float32 if k.startswith("lfm.") else torch.bfloat16,
            notes=["lfm.* stored as float32, every other floating tensor as bfloat16"],
        ),
        "tiny-b": FixtureSpec(
            name="tiny-b",
            config=cfg_b,
            seed=202,
            storage_dtype=lambda k: torch.bfloat16,
            notes=["every floating tensor stored as bfloat16"],
        ),
    }


# --------------------------------------------------------------------------------------------
# stage: models
# --------------------------------------------------------------------------------------------


def build_reference_model(config: dict):
    """Instantiate LFM2AudioModel from a config dict exactly as from_pretrained does."""
    from transformers import Lfm2Config

    from liquid_audio.model.conformer.encoder import ConformerEncoderConfig
    from liquid_audio.model.lfm2_audio import DepthformerConfig, LFM2AudioConfig, LFM2AudioModel

    config = copy.deepcopy(config)
    conf = LFM2AudioConfig(
        lfm=Lfm2Config(**config.pop("lfm")),
        encoder=ConformerEncoderConfig(**config.pop("encoder")),
        depthformer=DepthformerConfig(**config.pop("depthformer")),
        **config,
    )
    return LFM2AudioModel(conf)


def tied_keys(model: torch.nn.Module) -> dict[str, str]:
    """Map each state-dict key that aliases an earlier key to that earlier key."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def init_weights(model: torch.nn.Module, spec: FixtureSpec) -> dict[str, torch.Tensor]:
    """Deterministic random values for every state-dict entry, keyed by name."""
    from torch import nn

    norm_types: tuple[type, ...] = (nn.LayerNorm,)
    # RMSNorm classes of transformers and liquid-audio are recognised by name.
    values: dict[str, torch.Tensor] = {}
    aliases = tied_keys(model)
    modules = dict(model.named_modules())

    for key, ref in model.state_dict().items():
        if key in aliases:
            continue
        mod_name, _, leaf = key.rpartition(".")
        mod = modules[mod_name]
        g = tensor_generator(spec.seed, key)
        shape = ref.shape

        def normal(std: float) -> torch.Tensor:
            return torch.randn(shape, generator=g, dtype=torch.float32) * std

        is_norm = isinstance(mod, norm_types) or "RMSNorm" in type(mod).__name__
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if leaf == "weight":
                v = 1.0 + normal(0.1)
            elif leaf == "bias" or leaf == "running_mean":
                v = normal(0.1)
            elif leaf == "running_var":
                v = 0.5 + torch.rand(shape, generator=g)
            else:  # num_batches_tracked
                v = ref.clone()
        elif not ref.is_floating_point():
            v = ref.clone()  # integer buffers (codebook_offsets)
        elif key == "audio_loss_weights":
            v = ref.clone().float()
        elif is_norm:
            v = 1.0 + normal(0.1) if leaf == "weight" else normal(0.1)
        elif isinstance(mod, nn.Embedding):
            v = normal(1.0)
        elif isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            if leaf == "weight":
                fan_in = ref[0].numel()
                gain = 1.0
                if key.startswith("lfm.layers."):
                    if key.endswith(("self_attn.out_proj.weight", "conv.out_proj.weight")):
                        gain = spec.op_gain
                    elif key.endswith("feed_forward.w2.weight"):
                        gain = spec.ffn_gain
                v = normal(gain / fan_in**0.5)
            else:
                v = normal(0.1)
        else:
            # free parameters such as the conformer's pos_bias_u / pos_bias_v
            v = normal(0.5)
        values[key] = v.reshape(shape).to(ref.dtype) if not ref.is_floating_point() else v.reshape(shape)
    return values


def checkpoint_tensors(values: dict[str, torch.Tensor], spec: FixtureSpec) -> dict[str, torch.Tensor]:
    out = {}
    for k in sorted(values):
        v = values[k]
        out[k] = v.to(spec.storage_dtype(k)) if v.is_floating_point() else v
    return out


TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<|startoftext|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|pad|>",
    "clean_up_tokenization_spaces": False,
    "model_max_length": 128000,
}
SPECIAL_TOKENS_MAP = {"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>"}


def model_dir(args: argparse.Namespace, name: str) -> Path:
    return args.out / name / "model"


def stage_models(args: argparse.Namespace) -> None:
    fixture_tok = args.out / "tokenizer" / "fixture-tokenizer.json"
    if not fixture_tok.is_file():
        raise SystemExit(f"{fixture_tok} missing: run the tokenizer stage first")
    for name in args.models:
        spec = fixture_specs()[name]
        torch.manual_seed(spec.seed)  # module construction draws from the global RNG
        model = build_reference_model(spec.config)
        values = init_weights(model, spec)
        tensors = checkpoint_tensors(values, spec)
        d = model_dir(args, name)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        write_json(d / "config.json", spec.config)
        save_tensors(d / "model.safetensors", tensors, metadata={"format": "pt"})
        shutil.copyfile(fixture_tok, d / "tokenizer.json")
        write_json(d / "tokenizer_config.json", TOKENIZER_CONFIG)
        write_json(d / "special_tokens_map.json", SPECIAL_TOKENS_MAP)
        n_params = sum(v.numel() for v in tensors.values())
        log(f"{name}: {len(tensors)} tensors, {n_params} values, {(d / 'model.safetensors').stat().st_size} bytes")
        verify_loaded(name, d, tensors)


def load_reference(d: Path):
    from liquid_audio.model.lfm2_audio import LFM2AudioModel
    from liquid_audio.processor import LFM2AudioProcessor

    model = LFM2AudioModel.from_pretrained(d, dtype=torch.float32, device="cpu").eval()
    proc = LFM2AudioProcessor.from_pretrained(d, device="cpu").eval()
    return model, proc


def verify_loaded(name: str, d: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Load the checkpoint with the reference loader and check every tensor arrived intact."""
    model, _ = load_reference(d)
    aliases = tied_keys(model)
    sd = model.state_dict()
    for key, live in sd.items():
        src = aliases.get(key, key)
        if src not in tensors:
            raise RuntimeError(f"{name}: {key} not in the checkpoint (the reference would keep random values)")
        want = tensors[src]
        if live.is_floating_point():
            if live.dtype != torch.float32:
                raise RuntimeError(f"{name}: {key} loaded as {live.dtype}")
            ok = torch.equal(live, want.float())
        else:
            ok = torch.equal(live, want)
        if not ok:
            raise RuntimeError(f"{name}: {key} differs after from_pretrained")
    extra = set(tensors) - set(sd)
    if extra:
        raise RuntimeError(f"{name}: unexpected checkpoint keys {sorted(extra)[:5]}")
    log(f"{name}: from_pretrained reproduces all {len(sd)} state-dict entries")


# --------------------------------------------------------------------------------------------
# stage: text (prefill + greedy text decoding)
# --------------------------------------------------------------------------------------------


def build_chat(proc):
    from liquid_audio.processor import ChatState

    chat = ChatState(proc, dtype=torch.float32)
    chat.new_turn("system")
    chat.add_text(SYSTEM_PROMPT)
    chat.end_turn()
    chat.new_turn("user")
    chat.add_text(USER_PROMPT)
    chat.end_turn()
    chat.new_turn("assistant")
    return chat


def prefill_embeddings(model, chat) -> torch.Tensor:
    return model._prefill(
        text=chat.text,
        audio_in=chat.audio_in,
        audio_in_lens=chat.audio_in_lens,
        audio_out=chat.audio_out,
        modality_flag=chat.modality_flag,
    )


@torch.no_grad()
def run_prefill(model, in_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Backbone on the full prompt as generate_* does it; also capture each layer's output."""
    captured: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
        for layer in model.lfm.layers
    ]
    try:
        out = model.lfm(inputs_embeds=in_emb, past_key_values=None, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    layer_outputs = torch.stack([c[0] for c in captured])  # [n_layers, L, H]
    return out.last_hidden_state[0], layer_outputs, out.past_key_values


def text_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(hidden, model.lfm.embed_tokens.weight)


@torch.no_grad()
def greedy_text(model, in_emb: torch.Tensor, n: int) -> tuple[list[int], torch.Tensor]:
    """Text-only greedy loop mirroring the decode step of LFM2AudioModel.generate_sequential.

    No mode switch on <|audio_start|> and no stop on <|im_end|>: exactly n tokens.
    """
    cache = None
    tokens: list[int] = []
    logits_all = []
    for _ in range(n):
        lfm_out = model.lfm(inputs_embeds=in_emb, past_key_values=cache, use_cache=True)
        cache = lfm_out.past_key_values
        logits = text_logits(model, lfm_out.last_hidden_state[0, -1])
        next_token = model._sample_text_token(logits.clone(), temperature=None, top_k=None)
        tokens.append(int(next_token))
        logits_all.append(logits)
        in_emb = model.lfm.embed_tokens(next_token)[None, :]
    return tokens, torch.stack(logits_all)


def diversity(tokens: list[int]) -> dict:
    longest, run = 1, 1
    for a, b in zip(tokens, tokens[1:]):
        run = run + 1 if a == b else 1
        longest = max(longest, run)
    period = None
    for p in range(1, 6):  # does the tail settle into a short cycle?
        tail = tokens[-12:]
        if all(tail[i] == tail[i - p] for i in range(p, len(tail))):
            period = p
            break
    return {"distinct": len(set(tokens)), "longest_run": longest, "tail_cycle_period": period}


def margins(logits: torch.Tensor) -> list[float]:
    top2 = logits.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).tolist()


@torch.no_grad()
def layer_sensitivity(model, in_emb: torch.Tensor, base: list[int]) -> list[dict]:
    """For each decoder layer, perturb its operator output projection and its FFN w2 (separately)
    and count how many of the greedy tokens change."""
    report = []
    for i, layer in enumerate(model.lfm.layers):
        op = layer.self_attn.out_proj if hasattr(layer, "self_attn") else layer.conv.out_proj
        row = {"layer": i, "kind": "attention" if hasattr(layer, "self_attn") else "conv"}
        for label, lin in (("operator", op), ("ffn", layer.feed_forward.w2)):
            saved = lin.weight.detach().clone()
            lin.weight.mul_(0.8)
            toks, _ = greedy_text(model, in_emb, len(base))
            lin.weight.copy_(saved)
            row[f"{label}_changed"] = sum(a != b for a, b in zip(toks, base))
        report.append(row)
    return report


def stage_text(args: argparse.Namespace) -> None:
    for name in args.models:
        d = model_dir(args, name)
        model, proc = load_reference(d)
        chat = build_chat(proc)
        input_ids = chat.text[0].tolist()
        # The processor's tokenizer (AutoTokenizer) must agree with the plain tokenizers library.
        from tokenizers import Tokenizer

        plain = Tokenizer.from_file(str(d / "tokenizer.json"))
        expect = [1]
        for piece in ("<|im_start|>system\n", SYSTEM_PROMPT, "<|im_end|>\n", "<|im_start|>user\n", USER_PROMPT,
                      "<|im_end|>\n", "<|im_start|>assistant\n"):
            expect += plain.encode(piece, add_special_tokens=False).ids
        assert input_ids == expect, (input_ids, expect)

        with torch.no_grad():
            in_emb = prefill_embeddings(model, chat)
            L = in_emb.shape[1]
            hidden, layer_outputs, _ = run_prefill(model, in_emb)
            logits = text_logits(model, hidden)
            # Cross-check the index convention of output_hidden_states.
            hs = model.lfm(inputs_embeds=in_emb, use_cache=False, output_hidden_states=True).hidden_states
            hs_note = check_hidden_states_convention(hs, in_emb, layer_outputs, hidden)
            prefix_hidden, _, _ = run_prefill(model, in_emb[:, : L - PREFIX_CUT])
            tokens, greedy_logits = greedy_text(model, in_emb, N_GREEDY)
            assert torch.equal(greedy_logits[0], logits[-1]) or torch.allclose(greedy_logits[0], logits[-1], atol=1e-5)
            cross = cross_check_generate(model, chat, tokens)
            sens = layer_sensitivity(model, in_emb, tokens)

        div = diversity(tokens)
        marg = margins(greedy_logits)
        tensors = {
            "prefill.hidden": hidden,
            "prefill.layer_outputs": layer_outputs[:, 0] if layer_outputs.dim() == 4 else layer_outputs,
            "prefill.logits": logits,
            "prefill_prefix.hidden": prefix_hidden,
            "greedy.logits": greedy_logits,
        }
        tensors = {k: v.float().contiguous() for k, v in tensors.items()}
        save_tensors(args.out / name / "reference.safetensors", tensors)
        write_json(
            args.out / name / "reference.json",
            {
                "model": name,
                "reference": reference_versions(),
                "prompt": {
                    "system": SYSTEM_PROMPT,
                    "user": USER_PROMPT,
                    "pieces": ["<|startoftext|>", "<|im_start|>system\n", SYSTEM_PROMPT, "<|im_end|>\n",
                               "<|im_start|>user\n", USER_PROMPT, "<|im_end|>\n", "<|im_start|>assistant\n"],
                },
                "input_ids": input_ids,
                "prompt_len": L,
                "prefix_len": L - PREFIX_CUT,
                "greedy": {
                    "text_ids": tokens,
                    "n": N_GREEDY,
                    "top1_top2_margin_min": min(marg),
                    "diversity": div,
                    "matches_generate_sequential": cross,
                },
                "layer_sensitivity": sens,
                "hidden_states_convention": hs_note,
                "tensors": {k: {"shape": list(v.shape), "dtype": "f32"} for k, v in tensors.items()},
            },
        )
        log(f"{name}: L={L} greedy={tokens}")
        log(f"{name}: diversity {div}, min margin {min(marg):.4f}, generate_sequential check: {cross}")
        log(f"{name}: layer sensitivity {sens}")


def check_hidden_states_convention(hs, in_emb, layer_outputs, hidden) -> str:
    n = layer_outputs.shape[0]
    lo = layer_outputs[:, 0] if layer_outputs.dim() == 4 else layer_outputs
    if len(hs) == n + 1 and torch.allclose(hs[0][0], in_emb[0]) and all(
        torch.allclose(hs[i + 1][0], lo[i], atol=1e-5) for i in range(n - 1)
    ):
        last = "the output of the last layer" if torch.allclose(hs[n][0], lo[n - 1], atol=1e-5) else (
            "the final-normed hidden state" if torch.allclose(hs[n][0], hidden, atol=1e-5) else "something else")
        return (f"output_hidden_states has {len(hs)} entries: [0] is the input embedding, [i+1] the output of "
                f"decoder layer i; [{n}] is {last}. prefill.layer_outputs[i] = output of decoder layer i "
                f"(captured with a forward hook), i = 0..{n - 1}, before the final embedding_norm.")
    return f"output_hidden_states has {len(hs)} entries (unrecognised layout); layer_outputs come from forward hooks"


def cross_check_generate(model, chat, tokens: list[int]) -> str:
    """Compare with the reference's own generate_sequential where it is comparable."""
    n = len(tokens)
    for i, t in enumerate(tokens):
        if t in (7, 128):
            n = i + 1
            break
    out = [int(t) for t in model.generate_sequential(**chat, max_new_tokens=n)]
    if out != tokens[:n]:
        raise RuntimeError(f"greedy loop disagrees with generate_sequential: {out} vs {tokens[:n]}")
    return f"first {n} tokens identical"


def reference_versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("liquid-audio", "torch", "transformers", "accelerate", "tokenizers")}


# --------------------------------------------------------------------------------------------


STAGES: dict[str, Callable[[argparse.Namespace], None]] = {
    "tokenizer": stage_tokenizer,
    "models": stage_models,
    "text": stage_text,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages out of {list(STAGES)}")
    ap.add_argument("--models", default=",".join(fixture_specs()), help="comma-separated fixture model names")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="renamed real LFM2 tokenizer.json")
    args = ap.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    stages = [s for s in args.only.split(",") if s]
    for s in stages:
        if s not in STAGES:
            ap.error(f"unknown stage {s}")
    for m in args.models:
        if m not in fixture_specs():
            ap.error(f"unknown model {m}")

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if "tokenizer" in stages and not args.tokenizer.is_file():
        subprocess.run([sys.executable, str(HERE / "fetch_tokenizer.py"), str(args.tokenizer)], check=True)
    for s in STAGES:  # fixed order
        if s in stages:
            STAGES[s](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
