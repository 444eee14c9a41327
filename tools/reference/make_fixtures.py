#!/usr/bin/env python3
"""Build small random-weight LFM2-Audio checkpoints and record the reference outputs.

The reference implementation is the PyPI package `liquid-audio` (see requirements.txt). Every
expected number written here comes from running it on CPU in float32; nothing is computed by
hand. Rerunning the script rewrites byte-identical files (all randomness is seeded per tensor).

Stages (run all by default, or pick with --only):

    tokenizer   tests/fixtures/tokenizer/{cases.json, fixture-tokenizer.json, fixture-cases.json}
    models      tests/fixtures/<name>/model/{config.json, model.safetensors, tokenizer*.json, ...}
    text        tests/fixtures/<name>/reference.{json,safetensors}  (prefill + greedy text decode)
    audio       tests/fixtures/audio/{*.wav, clips.json}  (espeak-ng + sox; needs both on PATH)
    frontend    tests/fixtures/audio/{frontend.json, frontend/<clip>.safetensors}  (resampling, log-mel, bad inputs)
    asr         tests/fixtures/<name>/asr/<clip>.{json,safetensors}  (encoder, adapter, ASR prompt, greedy)
    speech      tests/fixtures/<name>/speech/<recording>.{json,safetensors}, tiny-c/speech/decode.*
                (interleaved / sequential generation with audio; LFM2 detokenizer and Mimi waveforms)

The models stage also writes tiny-c's audio_detokenizer/ and small Mimi. Running the reference on
these needs two patches, both applied only inside `reference_patches` (see there).

Usage:

    .venv-ref/bin/python tools/reference/make_fixtures.py [--only STAGE[,STAGE]] [--models tiny-a,tiny-b,tiny-c]

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
    asr_clips: list[str] | None = None  # None: every clip
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


# State-dict entries that are fixed buffers, stored with the reference's own value.
KEEP_BUFFERS = {"istft.window"}

# tiny-c: gains on single rows so that greedy decoding switches modality within a few steps.
# Row 128 (<|audio_start|>) of the tied text embedding / logit matrix makes the sequential loop
# emit <|audio_start|>; row 2048 (end of audio) of codebook 0's tied depthformer embedding / logit
# matrix makes an audio run end after a while.
TINY_C_ROW_GAINS: dict[str, dict[int, float]] = {
    "lfm.embed_tokens.weight": {128: 2.0, 130: 1.6},
    "depth_embeddings.0.embedding.weight": {2048: 2.5},
}

# LFM2.5-style audio_detokenizer/config.json, small. The keys are those of the real file; the
# layer pattern keeps sliding_attention layers and the 30-position window, n_fft/hop are fixed by
# the ISTFT in the reference code, so the output is the real 24 kHz shape (1920 samples/frame).
DETOKENIZER_CONFIG = {
    "architectures": ["Lfm25AudioTokenizer"],
    "model_type": "lfm2",
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "layer_types": ["conv", "sliding_attention", "conv", "sliding_attention"],
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 96,  # auto adjust: int(2*96/3)=64 -> multiple of 32 -> 64
    "block_auto_adjust_ff_dim": True,
    "block_ffn_dim_multiplier": 1.0,
    "block_multiple_of": 32,
    "conv_L_cache": 3,
    "conv_bias": False,
    "norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": 30,
    "output_size": 1282,
    "vocab_size": 64,
    "max_position_embeddings": 128000,
    "tie_word_embeddings": True,
    "use_cache": True,
    "dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 7,
    "pad_token_id": 0,
}

# Small Mimi: the kwargs dictionaries of liquid_audio/moshi/models/loaders.py with the same names,
# thinner everywhere; 24 kHz, 12.5 Hz frames, ratios [8, 6, 5, 4] and 2048-entry codebooks kept.
# The file holds 10 codebooks of which get_mimi activates 8 (the real one holds 32).
_MIMI_DIM = 32
MIMI_KWARGS = {
    "seanet": {
        "channels": 1,
        "dimension": _MIMI_DIM,
        "causal": True,
        "n_filters": 4,
        "n_residual_layers": 1,
        "activation": "ELU",
        "compress": 2,
        "dilation_base": 2,
        "disable_norm_outer_blocks": 0,
        "kernel_size": 7,
        "residual_kernel_size": 3,
        "last_kernel_size": 3,
        "norm": "none",
        "pad_mode": "constant",
        "ratios": [8, 6, 5, 4],
        "true_skip": True,
    },
    "quantizer": {
        "dimension": 8,
        "n_q": 10,
        "bins": 2048,
        "input_dimension": _MIMI_DIM,
        "output_dimension": _MIMI_DIM,
    },
    "transformer": {
        "d_model": _MIMI_DIM,
        "num_heads": 2,
        "num_layers": 2,
        "causal": True,
        "layer_scale": 0.01,
        "context": 8,
        "conv_layout": True,
        "max_period": 10000,
        "gating": "none",
        "norm": "layer_norm",
        "positional_embedding": "rope",
        "dim_feedforward": 64,
        "input_dimension": _MIMI_DIM,
        "output_dimensions": [_MIMI_DIM],
    },
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
    # tiny-c: LFM2.5-style directory (audio_detokenizer/ and a Mimi file next to the model); mixed key
    # spellings (layer_types + intermediate_size with auto adjust), a one-layer encoder, and two rows
    # boosted so that greedy decoding switches to audio and ends it (see TINY_C_ROW_GAINS).
    lfm_c = {
        "model_type": "lfm2",
        "vocab_size": FIXTURE_VOCAB,
        "hidden_size": 48,
        "num_hidden_layers": 4,
        "num_attention_heads": 3,
        "num_key_value_heads": 1,
        "intermediate_size": 192,  # auto adjust: int(2*192/3)=128 -> multiple of 64 -> 128
        "block_auto_adjust_ff_dim": True,
        "block_ffn_dim_multiplier": 1.0,
        "block_multiple_of": 64,
        "layer_types": ["conv", "full_attention", "conv", "full_attention"],
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
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
    cfg_c = _base_config(
        lfm_c,
        encoder_config(d_model=32, n_heads=2, channels=8, n_layers=1),
        {"layers": 2, "dim": 64, "tie": True},
        n_text=6,
        n_audio=12,
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
        "tiny-c": FixtureSpec(
            name="tiny-c",
            config=cfg_c,
            seed=303,
            storage_dtype=lambda k: torch.bfloat16,
            notes=["every floating tensor stored as bfloat16", "audio_detokenizer/ and a small Mimi"],
            row_gains=TINY_C_ROW_GAINS,
            text_fixture=False,
            # clips on which tiny-c stops on <|im_end|> (hi_16k, what_time_16k) or switches to audio
            asr_clips=["hi_16k", "what_time_16k", "hi_stereo_24k", "cut_320_16k", "cut_1279_16k", "cut_1280_16k"],
            detokenizer=DETOKENIZER_CONFIG,
            mimi=MIMI_KWARGS,
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


def init_weights(
    model: torch.nn.Module, spec: FixtureSpec, rng_prefix: str = "", row_gains: dict | None = None
) -> dict[str, torch.Tensor]:
    """Deterministic random values for every state-dict entry, keyed by name.

    `rng_prefix` is prepended to the key when seeding (so that two modules of one fixture with the
    same key names draw different values); `row_gains` defaults to the fixture's."""
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
        g = tensor_generator(spec.seed, rng_prefix + key)
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
        elif key in KEEP_BUFFERS:
            v = ref.clone().float()  # fixed buffers such as the ISTFT window
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
        v = v.reshape(shape).to(ref.dtype) if not ref.is_floating_point() else v.reshape(shape)
        for row, gain in (spec.row_gains if row_gains is None else row_gains).get(key, {}).items():
            v[row] *= gain
        values[key] = v
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
        if spec.detokenizer is not None:
            write_detokenizer(spec, d)
        if spec.mimi is not None:
            write_mimi(spec, d)


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
# audio detokenizer and Mimi (part of the models stage for fixtures that have them)
# --------------------------------------------------------------------------------------------

MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
MIMI_OUTPUT_GAIN = 0.2


def fixture_detokenizer_class():
    """The reference's LFM2AudioDetokenizer with two changes needed to run it on these fixtures.

    1. `__init__` hard-codes the width 512 (`FusedEmbedding(512)`, `nn.Linear(512, 1282)`); here the
       width is `config.hidden_size` (512 in the real config), so that a small detokenizer fits.
    2. `LFM2AudioProcessor.audio_detokenizer` calls `.cuda()` unconditionally; here `.cuda()` is a
       no-op, so the module stays on the CPU in float32.
    `forward`, `FusedEmbedding` and `ISTFT` are the reference's, unchanged.
    """
    from torch import nn

    from liquid_audio.detokenizer import FusedEmbedding, LFM2AudioDetokenizer

    class FixtureDetokenizer(LFM2AudioDetokenizer):
        def __init__(self, backbone_config):
            super().__init__(backbone_config)
            width = backbone_config.hidden_size
            if width != 512:
                self.emb = FusedEmbedding(width)
                self.lin = nn.Linear(width, 1282)

        def cuda(self, device=None):  # noqa: ARG002
            return self

    return FixtureDetokenizer


class reference_patches:
    """Context manager: run the reference's own loaders (`LFM2AudioProcessor.audio_detokenizer`,
    `LFM2AudioProcessor.mimi` -> `moshi.models.loaders.get_mimi`) on a fixture.

    - `liquid_audio.processor.LFM2AudioDetokenizer` is replaced by `fixture_detokenizer_class()`;
    - the module-level kwargs dictionaries `_seanet_kwargs`, `_quantizer_kwargs`,
      `_transformer_kwargs` of `liquid_audio.moshi.models.loaders` (read by `get_mimi`) are replaced
      by the fixture's small Mimi configuration.
    """

    def __init__(self, spec: FixtureSpec):
        self.spec = spec

    def __enter__(self):
        import liquid_audio.processor as lap
        from liquid_audio.moshi.models import loaders

        self._saved = (lap.LFM2AudioDetokenizer, loaders._seanet_kwargs, loaders._quantizer_kwargs,
                       loaders._transformer_kwargs)
        lap.LFM2AudioDetokenizer = fixture_detokenizer_class()
        if self.spec.mimi is not None:
            loaders._seanet_kwargs = copy.deepcopy(self.spec.mimi["seanet"])
            loaders._quantizer_kwargs = copy.deepcopy(self.spec.mimi["quantizer"])
            loaders._transformer_kwargs = copy.deepcopy(self.spec.mimi["transformer"])
        return self

    def __exit__(self, *exc):
        import liquid_audio.processor as lap
        from liquid_audio.moshi.models import loaders

        (lap.LFM2AudioDetokenizer, loaders._seanet_kwargs, loaders._quantizer_kwargs,
         loaders._transformer_kwargs) = self._saved
        return False


def build_detokenizer(config_path: Path):
    """Instantiate the detokenizer exactly as LFM2AudioProcessor.audio_detokenizer does."""
    from transformers import Lfm2Config

    cfg = Lfm2Config.from_pretrained(config_path)
    cfg.layer_types = ["full_attention" if t == "sliding_attention" else t for t in cfg.layer_types]
    return fixture_detokenizer_class()(cfg).eval()


def write_detokenizer(spec: FixtureSpec, d: Path) -> None:
    dd = d / "audio_detokenizer"
    dd.mkdir(parents=True)
    write_json(dd / "config.json", spec.detokenizer)
    torch.manual_seed(spec.seed)
    detok = build_detokenizer(dd / "config.json")
    values = init_weights(detok, spec, rng_prefix="audio_detokenizer/", row_gains={})
    tensors = {
        k: (v.to(torch.bfloat16) if v.is_floating_point() and k not in KEEP_BUFFERS else v)
        for k, v in sorted(values.items())
    }
    save_tensors(dd / "model.safetensors", tensors, metadata={"format": "pt"})
    log(f"{spec.name}: audio_detokenizer {len(tensors)} tensors, {(dd / 'model.safetensors').stat().st_size} bytes")

    from liquid_audio.processor import LFM2AudioProcessor

    proc = LFM2AudioProcessor.from_pretrained(d, device="cpu")
    with reference_patches(spec):
        live = proc.audio_detokenizer
    check_state_dict(f"{spec.name}/audio_detokenizer", live, tensors)


def check_state_dict(label: str, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    sd = model.state_dict()
    if set(sd) != set(tensors):
        raise RuntimeError(f"{label}: key mismatch {sorted(set(sd) ^ set(tensors))[:5]}")
    for k, live in sd.items():
        want = tensors[k]
        if live.is_floating_point() and live.dtype != torch.float32:
            raise RuntimeError(f"{label}: {k} loaded as {live.dtype}")
        if not torch.equal(live, want.to(live.dtype)):
            raise RuntimeError(f"{label}: {k} differs after loading")
    log(f"{label}: the reference loader reproduces all {len(sd)} state-dict entries")


def init_mimi_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random values for every Mimi state-dict entry (float32)."""
    from torch import nn

    modules = dict(model.named_modules())
    values = {}
    # the decoder's last convolution is scaled down so that the waveform stays within about +-1
    last = max(int(k.split(".")[2]) for k in model.state_dict() if k.startswith("decoder.model."))
    for key, ref in model.state_dict().items():
        mod_name, _, leaf = key.rpartition(".")
        mod = modules[mod_name]
        g = tensor_generator(seed, "mimi/" + key)
        shape = ref.shape

        def normal(std: float) -> torch.Tensor:
            return torch.randn(shape, generator=g, dtype=torch.float32) * std

        if leaf == "_initialized":
            v = torch.ones(shape)
        elif leaf == "cluster_usage":
            v = 0.5 + torch.rand(shape, generator=g)
        elif leaf == "embedding_sum":
            v = normal(1.0)
        elif isinstance(mod, nn.LayerNorm):
            v = 1.0 + normal(0.1) if leaf == "weight" else normal(0.1)
        elif leaf == "scale":  # LayerScale
            v = 0.3 + normal(0.05)
        elif isinstance(mod, nn.ConvTranspose1d) and leaf == "weight":
            # each output sample sees (in/groups) * kernel/stride weights
            fan_in = ref.shape[0] // mod.groups * mod.kernel_size[0] / mod.stride[0]
            v = normal(1.0 / fan_in**0.5)
        elif isinstance(mod, (nn.Conv1d, nn.Linear)) and leaf == "weight":
            v = normal(1.0 / ref[0].numel() ** 0.5)
        elif isinstance(mod, (nn.Conv1d, nn.ConvTranspose1d)) and leaf == "bias":
            v = normal(0.1)
        else:
            raise RuntimeError(f"no init rule for Mimi entry {key} ({type(mod).__name__})")
        if key.startswith(f"decoder.model.{last}."):
            v = v * MIMI_OUTPUT_GAIN
        values[key] = v.reshape(shape)
    return values


def mimi_config_doc(spec: FixtureSpec, model) -> dict:
    """mimi_config.json: everything get_mimi passes, plus the defaults it leaves in place."""
    import inspect

    from liquid_audio.moshi.models import loaders
    from liquid_audio.moshi.modules import SEANetDecoder, transformer
    from liquid_audio.moshi.quantization import SplitResidualVectorQuantizer

    def defaults(fn, passed: dict) -> dict:
        out = {}
        for name, p in inspect.signature(fn).parameters.items():
            if name in passed or name in ("self", "device", "dtype", "kwargs", "args", "rope") or p.default is inspect._empty:
                continue
            v = p.default
            out[name] = v if isinstance(v, (int, float, str, bool, list, dict, type(None))) else repr(v)
        return out

    kw = spec.mimi
    tr_passed = {k: v for k, v in kw["transformer"].items()}
    return {
        "description": "small random-weight Mimi built with liquid_audio.moshi.models.loaders.get_mimi, its "
                       "module-level _seanet_kwargs / _quantizer_kwargs / _transformer_kwargs replaced by the "
                       "dictionaries below (names as in the vendored code); weights: " + MIMI_FILE,
        "seanet_kwargs": kw["seanet"],
        "quantizer_kwargs": kw["quantizer"],
        "transformer_kwargs": kw["transformer"],
        "mimi_model_kwargs": {
            "channels": 1,
            "sample_rate": loaders.SAMPLE_RATE,
            "frame_rate": loaders.FRAME_RATE,
            "encoder_frame_rate": loaders.SAMPLE_RATE / model.encoder.hop_length,
            "causal": True,
            "resample_method": "conv",
            "upsample_channel_wise_bug": True,
        },
        "num_codebooks": 8,
        "derived": {
            "hop_length": model.encoder.hop_length,
            "frame_size": model.frame_size,
            "decoder_transformer_rope": "interleaved pairs, max_period from transformer_kwargs",
            "upsample": "ConvTrUpsample1d(stride 2, learnt, causal, channel_wise=True): depthwise ConvTranspose1d, "
                        "kernel 4, groups = dimension, no bias",
        },
        "defaults_left_in_place": {
            "SEANetDecoder": defaults(SEANetDecoder.__init__, kw["seanet"]),
            "SplitResidualVectorQuantizer": defaults(SplitResidualVectorQuantizer.__init__, kw["quantizer"]),
            "StreamingTransformer": defaults(transformer.StreamingTransformer.__init__, tr_passed),
            "StreamingTransformerLayer": defaults(transformer.StreamingTransformerLayer.__init__, tr_passed),
        },
    }


def write_mimi(spec: FixtureSpec, d: Path) -> None:
    from liquid_audio.moshi.models import loaders

    with reference_patches(spec):
        model = loaders.get_mimi(None, device="cpu")
    values = init_mimi_weights(model, spec.seed)
    # bfloat16 like the other fixture weights (the reference copies them into its float32 modules)
    tensors = {k: values[k].to(torch.bfloat16) for k in sorted(values)}
    save_tensors(d / MIMI_FILE, tensors)
    write_json(d / "mimi_config.json", mimi_config_doc(spec, model))
    log(f"{spec.name}: Mimi {len(tensors)} tensors, {(d / MIMI_FILE).stat().st_size} bytes")

    from liquid_audio.processor import LFM2AudioProcessor

    proc = LFM2AudioProcessor.from_pretrained(d, device="cpu")
    with reference_patches(spec):
        live = proc.mimi
    check_state_dict(f"{spec.name}/mimi", live, tensors)


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
        if not fixture_specs()[name].text_fixture:
            continue
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
# stage: audio (input speech clips made with espeak-ng and sox)
# --------------------------------------------------------------------------------------------

AUDIO_DIR = "audio"
ESPEAK_TEXTS = {
    "hi": ("Hi.", 160),
    "what_time": ("What time is it now?", 160),
    "fox": ("The quick brown fox jumps over the lazy dog.", 175),
}
ESPEAK_VOICE = "en-us"
ESPEAK_VOICE_2 = "en-gb+f3"  # the right channel of the stereo clip
# sox effects: strip leading and trailing silence (then resample where asked)
SOX_TRIM = ["silence", "1", "0.005", "0.5%", "reverse", "silence", "1", "0.005", "0.5%", "reverse"]
# (clip name, source text key, output rate); 22050 Hz is espeak-ng's own rate (no resampling)
TTS_CLIPS = [
    ("hi_16k", "hi", 16000),
    ("what_time_16k", "what_time", 16000),
    ("fox_16k", "fox", 16000),
    ("hi_8k", "hi", 8000),
    ("hi_22k05", "hi", 22050),
    ("hi_24k", "hi", 24000),
    ("hi_44k1", "hi", 44100),
    ("hi_48k", "hi", 48000),
]
STEREO_CLIP = "hi_stereo_24k"
STEREO_SOURCE = "hi"
# short cuts from what_time_16k (starting at CUT_OFFSET): n samples -> T_mel = n // 160 + 1
CUT_SOURCE = "what_time_16k"
CUT_OFFSET = 8000
CUT_LENGTHS = [1, 159, 160, 320, 1279, 1280]


def clip_names() -> list[str]:
    return [c for c, _, _ in TTS_CLIPS] + [STEREO_CLIP] + [f"cut_{n}_16k" for n in CUT_LENGTHS]


def tool_version(cmd: list[str]) -> str:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return (out.stdout + out.stderr).strip().splitlines()[0]


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def read_wav(path: Path) -> tuple[torch.Tensor, int]:
    """16-bit PCM WAV -> float32 [channels, N] (int16 / 32768, as soundfile's dtype="float32"), rate."""
    import wave

    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2, path
        ch, sr, n = w.getnchannels(), w.getframerate(), w.getnframes()
        raw = w.readframes(n)
    pcm = torch.frombuffer(bytearray(raw), dtype=torch.int16).reshape(n, ch).T
    return pcm.to(torch.float32) / 32768.0, sr


def write_wav(path: Path, pcm: torch.Tensor, sr: int) -> None:
    import wave

    assert pcm.dtype == torch.int16 and pcm.dim() == 2
    with wave.open(str(path), "wb") as w:
        w.setnchannels(pcm.shape[0])
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.T.contiguous().numpy().tobytes())


def stage_audio(args: argparse.Namespace) -> None:
    import tempfile

    out = args.out / AUDIO_DIR
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "tools": {"espeak-ng": tool_version(["espeak-ng", "--version"]), "sox": tool_version(["sox", "--version"])},
        "reading": "16-bit PCM; samples are int16 / 32768 in float32 (soundfile's dtype='float32', as in the "
                   "package README); stereo is downmixed to the mean of the two channels before add_audio",
        "clips": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        raw: dict[str, Path] = {}
        for key, (text, speed) in ESPEAK_TEXTS.items():
            raw[key] = tmp / f"{key}.wav"
            run(["espeak-ng", "-v", ESPEAK_VOICE, "-s", str(speed), "-w", str(raw[key]), text])
        for name, key, rate in TTS_CLIPS:
            effects = SOX_TRIM + ([] if rate == 22050 else ["rate", "-h", str(rate)])
            run(["sox", "-R", "-D", str(raw[key]), "-b", "16", str(out / f"{name}.wav"), *effects])
            text, speed = ESPEAK_TEXTS[key]
            meta["clips"][name] = {
                "text": text,
                "commands": [f"espeak-ng -v {ESPEAK_VOICE} -s {speed} -w raw.wav '{text}'",
                             f"sox -R -D raw.wav -b 16 {name}.wav {' '.join(effects)}"],
            }
        # stereo: left = en-us voice, right = another voice, same sentence; sox -M pads the shorter
        text, speed = ESPEAK_TEXTS[STEREO_SOURCE]
        raw2 = tmp / "right.raw.wav"
        run(["espeak-ng", "-v", ESPEAK_VOICE_2, "-s", str(speed), "-w", str(raw2), text])
        left, right = tmp / "left.wav", tmp / "right.wav"
        eff = SOX_TRIM + ["rate", "-h", "24000"]
        run(["sox", "-R", "-D", str(raw[STEREO_SOURCE]), "-b", "16", str(left), *eff])
        run(["sox", "-R", "-D", str(raw2), "-b", "16", str(right), *eff])
        run(["sox", "-R", "-D", "-M", str(left), str(right), "-b", "16", str(out / f"{STEREO_CLIP}.wav")])
        meta["clips"][STEREO_CLIP] = {
            "text": text,
            "commands": [f"espeak-ng -v {ESPEAK_VOICE} -s {speed} -w raw_left.wav '{text}'",
                         f"espeak-ng -v {ESPEAK_VOICE_2} -s {speed} -w raw_right.wav '{text}'",
                         f"sox -R -D raw_left.wav -b 16 left.wav {' '.join(eff)}",
                         f"sox -R -D raw_right.wav -b 16 right.wav {' '.join(eff)}",
                         f"sox -R -D -M left.wav right.wav -b 16 {STEREO_CLIP}.wav"],
            "note": "channel 0 = en-us voice, channel 1 = en-gb+f3 voice; sox -M pads the shorter channel with silence",
        }
    # short cuts, written with Python's wave module
    src, sr = read_wav(out / f"{CUT_SOURCE}.wav")
    pcm = torch.round(src * 32768.0).to(torch.int16)
    for n in CUT_LENGTHS:
        name = f"cut_{n}_16k"
        write_wav(out / f"{name}.wav", pcm[:, CUT_OFFSET: CUT_OFFSET + n], sr)
        meta["clips"][name] = {"cut_from": CUT_SOURCE, "offset": CUT_OFFSET, "n_samples": n}
    for name in clip_names():
        wav, sr = read_wav(out / f"{name}.wav")
        meta["clips"][name].update({"file": f"{name}.wav", "sample_rate": sr, "channels": wav.shape[0],
                                    "n_samples": wav.shape[1], "seconds": round(wav.shape[1] / sr, 4)})
    write_json(out / "clips.json", meta)
    log("audio: " + ", ".join(f"{k} {v['n_samples']}@{v['sample_rate']}" for k, v in meta["clips"].items()))


# --------------------------------------------------------------------------------------------
# stage: frontend (resampling + log-mel, model independent; bad inputs)
# --------------------------------------------------------------------------------------------


def load_clip(args: argparse.Namespace, name: str) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """The waveform as the reference gets it: float32 [1, N] at the file's rate (stereo: mean of
    the channels); also returns the raw [channels, N] when it is not mono."""
    wav, sr = read_wav(args.out / AUDIO_DIR / f"{name}.wav")
    if wav.shape[0] == 1:
        return wav, sr, None
    return wav.mean(0, keepdim=True), sr, wav


def frontend_processor(args: argparse.Namespace):
    """Any fixture's processor: the preprocessor section is the same in every fixture config."""
    from liquid_audio.processor import LFM2AudioProcessor

    specs = fixture_specs()
    assert all(s.config["preprocessor"] == PREPROCESSOR for s in specs.values())
    for name in specs:
        d = model_dir(args, name)
        if (d / "config.json").is_file():
            return LFM2AudioProcessor.from_pretrained(d, device="cpu").eval()
    raise SystemExit("no fixture model directory: run the models stage first")


def error_record(fn: Callable[[], Any]) -> dict:
    import traceback

    try:
        fn()
    except Exception as e:  # noqa: BLE001
        frame = traceback.extract_tb(e.__traceback__)[-1]
        where = frame.filename.split("site-packages/")[-1]
        return {"raises": type(e).__name__, "message": str(e), "at": f"{where}:{frame.lineno} ({frame.name})",
                "code": (frame.line or "").strip()}
    return {"raises": None}


def stage_frontend(args: argparse.Namespace) -> None:
    import torchaudio

    from liquid_audio.processor import ChatState
    from liquid_audio.utils import mel2emb_len

    proc = frontend_processor(args)
    out = args.out / AUDIO_DIR / "frontend"
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name in clip_names():
        wave, sr, raw = load_clip(args, name)
        chat = ChatState(proc, dtype=torch.float32)
        chat.add_audio(wave, sr)
        mel = chat.audio_in  # [128, T_mel]
        resampled = torchaudio.functional.resample(wave, sr, 16_000)  # the call inside add_audio
        # the recorded resampled waveform is what the mel front-end sees
        again, _ = proc.audio(resampled, torch.tensor([resampled.shape[1]]))
        assert torch.equal(again[0], mel), name
        tensors = {"mel": mel}
        if sr != 16_000:
            tensors["resampled"] = resampled[0]
        tensors = {k: v.float().contiguous() for k, v in tensors.items()}
        save_tensors(out / f"{name}.safetensors", tensors)
        n16 = resampled.shape[1]
        summary[name] = {
            "sample_rate": sr,
            "channels": 1 if raw is None else raw.shape[0],
            "n_samples": wave.shape[1],
            "n_samples_16k": n16,
            "t_mel": mel.shape[1],
            "valid_frames": n16 // 160,
            "audio_in_positions": mel2emb_len(mel.shape[1]),
            "mel_all_zero": bool((mel == 0).all()),
            "tensors": {k: list(v.shape) for k, v in tensors.items()},
        }
    # inputs the reference cannot take
    bad = {}

    def add(wave, sr):
        chat = ChatState(proc, dtype=torch.float32)
        chat.add_audio(wave, sr)
        return chat

    w16, _, _ = load_clip(args, "what_time_16k")
    st, st_sr, st_raw = load_clip(args, STEREO_CLIP)
    bad["empty_16k"] = {"input": "float32 [1, 0] at 16000 Hz", **error_record(lambda: add(torch.zeros(1, 0), 16000))}
    bad["empty_24k"] = {"input": "float32 [1, 0] at 24000 Hz", **error_record(lambda: add(torch.zeros(1, 0), 24000))}
    bad["stereo_channels_first"] = {"input": f"float32 [2, N] (both channels of {STEREO_CLIP})",
                                    **error_record(lambda: add(st_raw, st_sr))}
    bad["stereo_soundfile_layout"] = {"input": "float32 [1, N, 2] (sf.read(...) of a stereo file, then "
                                               "unsqueeze(0), as the README does)",
                                      **error_record(lambda: add(st_raw.T.unsqueeze(0), st_sr))}
    bad["one_dimensional"] = {"input": "float32 [N] (no channel axis)", **error_record(lambda: add(w16[0], 16000))}
    write_json(out.parent / "frontend.json", {
        "mel": "ChatState(proc, dtype=float32).add_audio(wave, sr).audio_in: [128, T_mel], T_mel = n_16k // 160 + 1; "
               "frames t >= n_16k // 160 are zero",
        "resampled": "torchaudio.functional.resample(wave, sr, 16000) (defaults), [n_16k]; only for sr != 16000",
        "downmix": "stereo files: wave = (channel0 + channel1) / 2 in float32, [1, N] at the file's rate, is what "
                   "add_audio receives (exact: the sum of two int16/32768 values and the halving are exact in f32)",
        "clips": summary,
        "bad_inputs": bad,
        "reference": reference_versions(),
    })
    log("frontend: " + ", ".join(f"{k} T_mel={v['t_mel']}" for k, v in summary.items()))
    log("frontend bad inputs: " + ", ".join(f"{k}: {v['raises']}" for k, v in bad.items()))


# --------------------------------------------------------------------------------------------
# stage: asr (encoder, adapter, ASR prompt, greedy generate_sequential)
# --------------------------------------------------------------------------------------------

N_ASR_STEPS = 30
ASR_SYSTEM = "Perform ASR."


class Recorder:
    """Forward hooks that keep module outputs in call order."""

    def __init__(self):
        self.hooks = []
        self.calls: dict[str, list] = {}

    def watch(self, label: str, module: torch.nn.Module, pick: Callable[[Any], Any] = lambda o: o):
        self.calls[label] = []

        def hook(_m, _i, out):
            self.calls[label].append(pick(out))

        self.hooks.append(module.register_forward_hook(hook))

    def close(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []


def audio_chat(proc, system: str, wave: torch.Tensor, sr: int):
    from liquid_audio.processor import ChatState

    chat = ChatState(proc, dtype=torch.float32)
    chat.new_turn("system")
    chat.add_text(system)
    chat.end_turn()
    chat.new_turn("user")
    chat.add_audio(wave, sr)
    chat.end_turn()
    chat.new_turn("assistant")
    return chat


def text_chat(proc, system: str, user: str):
    from liquid_audio.processor import ChatState

    chat = ChatState(proc, dtype=torch.float32)
    chat.new_turn("system")
    chat.add_text(system)
    chat.end_turn()
    chat.new_turn("user")
    chat.add_text(user)
    chat.end_turn()
    chat.new_turn("assistant")
    return chat


def chat_layout(chat) -> dict:
    flags = chat.modality_flag[0].tolist()
    audio_pos = [i for i, f in enumerate(flags) if f == 2]
    return {
        "input_ids": chat.text[0].tolist(),
        "modality_flag": flags,
        "modality_ids": {"TEXT": 1, "AUDIO_IN": 2, "AUDIO_OUT": 3},
        "audio_in_start": audio_pos[0] if audio_pos else None,
        "audio_in_count": len(audio_pos),
        "audio_in_lens": chat.audio_in_lens.tolist(),
        "sequence_length": len(flags),
    }


def item_list(out: list[torch.Tensor]) -> list[dict]:
    return [{"text": int(t)} if t.numel() == 1 else {"audio": [int(c) for c in t]} for t in out]


def item_summary(items: list[dict]) -> dict:
    first_audio = next((i for i, it in enumerate(items) if "audio" in it), None)
    audio_start = next((i for i, it in enumerate(items) if it.get("text") == 128), None)
    eoa = [i for i, it in enumerate(items) if "audio" in it and it["audio"][0] == 2048]
    return {
        "n_items": len(items),
        "n_text": sum("text" in it for it in items),
        "n_audio": sum("audio" in it for it in items),
        "audio_start_token_at": audio_start,
        "first_audio_frame_at": first_audio,
        "eoa_frames_at": eoa,
        "text_end_at": next((i for i, it in enumerate(items) if it.get("text") == 130), None),
        "im_end_at": next((i for i, it in enumerate(items) if it.get("text") == 7), None),
    }


def stage_asr(args: argparse.Namespace) -> None:
    for name in args.models:
        spec = fixture_specs()[name]
        if not spec.asr_fixture:
            continue
        d = model_dir(args, name)
        model, proc = load_reference(d)
        out = args.out / name / "asr"
        out.mkdir(parents=True, exist_ok=True)
        n_layers = len(model.conformer.layers)
        for clip in spec.asr_clips or clip_names():
            wave, sr, _ = load_clip(args, clip)
            chat = audio_chat(proc, ASR_SYSTEM, wave, sr)
            rec = Recorder()
            rec.watch("pre_encode", model.conformer.pre_encode, lambda o: o[0][0])
            rec.watch("pos_emb", model.conformer.pos_enc, lambda o: o[1][0])
            for i, layer in enumerate(model.conformer.layers):
                rec.watch(f"layer{i}", layer, lambda o: o[0])
            rec.watch("encoder", model.conformer, lambda o: o[0][0].T)
            rec.watch("adapter", model.audio_adapter)
            with torch.no_grad():
                in_emb = prefill_embeddings(model, chat)
            rec.close()
            c = {k: v for k, v in rec.calls.items()}
            assert all(len(v) == 1 for v in c.values()), {k: len(v) for k, v in c.items()}
            with torch.no_grad():
                hidden = model.lfm(inputs_embeds=in_emb, use_cache=True).last_hidden_state[0]
                logits_last = text_logits(model, hidden[-1])
            # the reference's own greedy generation; the backbone's last hidden at every step
            items, gen_tensors, extra = record_generation(model, chat, "sequential", N_ASR_STEPS)
            assert torch.allclose(gen_tensors["steps.hidden"][0], hidden[-1], atol=1e-5)
            tensors = {}
            if sr == 16_000:  # encoder internals once per recording, not again for resampled inputs
                tensors.update({
                    "encoder.pre_encode": c["pre_encode"][0],
                    "encoder.pos_emb": c["pos_emb"][0],
                    "encoder.layers": torch.stack([c[f"layer{i}"][0] for i in range(n_layers)]),
                })
            tensors.update({
                "encoder.output": c["encoder"][0],
                "adapter.output": c["adapter"][0],
                "prefill.hidden_last": hidden[-1],
                "prefill.logits_last": logits_last,
                **gen_tensors,
            })
            tensors = {k: v.float().contiguous() for k, v in tensors.items()}
            save_tensors(out / f"{clip}.safetensors", tensors)
            write_json(out / f"{clip}.json", {
                "model": name,
                "clip": clip,
                "prompt": ["<|startoftext|>", "<|im_start|>system\n", ASR_SYSTEM, "<|im_end|>\n",
                           "<|im_start|>user\n", "<audio>", "<|im_end|>\n", "<|im_start|>assistant\n"],
                **chat_layout(chat),
                "t_mel": int(chat.audio_in.shape[1]),
                "t_enc": int(tensors["encoder.output"].shape[0]),
                "generate": {"loop": "generate_sequential", "max_new_tokens": N_ASR_STEPS, "sampling": "greedy",
                             "items": items, **item_summary(items), **extra},
                "tensors": {k: list(v.shape) for k, v in tensors.items()},
            })
            log(f"{name} asr {clip}: L={in_emb.shape[1]} T'={tensors['encoder.output'].shape[0]} "
                f"{item_summary(items)}")


# --------------------------------------------------------------------------------------------
# stage: speech (interleaved / sequential generation with audio output; detokenizer and Mimi)
# --------------------------------------------------------------------------------------------

N_SPEECH_STEPS = 60
S2S_SYSTEM = "Respond with interleaved text and audio."
S2S_CLIP = "what_time_16k"
TTS_SYSTEM = "Perform TTS. Use the US male voice."
TTS_TEXT = "Hello! The weather is sunny today."
DECODE_SOURCE = "tts_sequential"  # the recording whose frames are decoded to waveforms
DECODE_FRAMES = 12  # its first 12 frames: 72 detokenizer positions (> window 30), 24 Mimi steps (> context 8)


# (recording, system prompt, user turn: ("audio", clip) or ("text", str), loop)
SPEECH_RECORDINGS = [
    ("s2s_interleaved", S2S_SYSTEM, ("audio", S2S_CLIP), "interleaved"),
    ("s2s_sequential", S2S_SYSTEM, ("audio", S2S_CLIP), "sequential"),
    ("tts_interleaved", TTS_SYSTEM, ("text", TTS_TEXT), "interleaved"),
    ("tts_sequential", TTS_SYSTEM, ("text", TTS_TEXT), "sequential"),
    # two more user texts, chosen because tiny-c stops on <|im_end|> with them
    ("tts_stop_interleaved", TTS_SYSTEM, ("text", "It is raining in Paris."), "interleaved"),
    ("tts_stop_sequential", TTS_SYSTEM, ("text", "Good morning."), "sequential"),
]


def speech_chat(args: argparse.Namespace, proc, system: str, user: tuple[str, str]) -> tuple[Any, list[str]]:
    kind, value = user
    if kind == "audio":
        wave, sr, _ = load_clip(args, value)
        chat, piece = audio_chat(proc, system, wave, sr), f"<audio {value}>"
    else:
        chat, piece = text_chat(proc, system, value), value
    return chat, ["<|startoftext|>", "<|im_start|>system\n", system, "<|im_end|>\n", "<|im_start|>user\n", piece,
                  "<|im_end|>\n", "<|im_start|>assistant\n"]


@torch.no_grad()
def record_generation(model, chat, loop: str, n: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Run the reference's generate_<loop> (greedy) and capture, besides the yielded items, the
    backbone's last hidden state at every step and the audio head's intermediates of the first
    audio frame."""
    rec = Recorder()
    rec.watch("lfm", model.lfm, lambda o: o.last_hidden_state[0, -1])
    rec.watch("depth_linear", model.depth_linear)
    rec.watch("audio_embedding", model.audio_embedding)
    depthformer_out: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    orig_fc = model.depthformer.forward_cached

    def forward_cached(x, cache):
        out, cache = orig_fc(x, cache)
        depthformer_out.append(out.reshape(-1).clone())
        return out, cache

    def wrap_logits(fn):
        def get_logits(x):
            y = fn(x)
            logits.append(y.clone())
            return y

        return get_logits

    model.depthformer.forward_cached = forward_cached
    for emb in model.depth_embeddings:
        emb.get_logits = wrap_logits(emb.get_logits)
    try:
        gen = getattr(model, f"generate_{loop}")
        out = [t.clone() for t in gen(**chat, max_new_tokens=n)]
    finally:
        rec.close()
        del model.depthformer.forward_cached
        for emb in model.depth_embeddings:
            del emb.get_logits
    items = item_list(out)
    steps_hidden = torch.stack(rec.calls["lfm"])
    # one backbone step per item; generate_interleaved also runs the step that samples <|im_end|>,
    # which it neither yields nor feeds back: then there is one more step than items
    extra = steps_hidden.shape[0] - len(items)
    assert extra == 0 or (loop == "interleaved" and extra == 1 and len(items) < n), (steps_hidden.shape, len(items))
    if extra:
        last = text_logits(model, steps_hidden[-1]).argmax().item()
        assert last == 7, last
    tensors = {"steps.hidden": steps_hidden}
    # greedy robustness: smallest gap between the two best logits over all text steps / all codebooks
    text_steps = [i for i, it in enumerate(items) if "text" in it] + ([len(items)] if extra else [])
    gaps = {
        "text_top1_top2_margin_min": min(margins(text_logits(model, steps_hidden[text_steps]))) if text_steps else None,
        "audio_top1_top2_margin_min": min(margins(torch.stack(logits))) if logits else None,
    }
    first = next((i for i, it in enumerate(items) if "audio" in it), None)
    if first is not None:
        C = model.codebooks
        frame_logits = torch.stack(logits[:C])
        greedy = frame_logits.argmax(-1).tolist()
        codes = items[first]["audio"]
        assert greedy == codes or (greedy[0] == 2048 and codes == [2048] * C), (greedy, codes)
        fed = [e for e in rec.calls["audio_embedding"] if e.dim() == 2]  # [C, H] lookups of yielded frames
        tensors.update({
            "first_frame.depth_linear": rec.calls["depth_linear"][0].reshape(C, -1),
            "first_frame.depthformer_out": torch.stack(depthformer_out[:C]),
            "first_frame.logits": frame_logits,
        })
        if fed:
            tensors["first_frame.audio_embedding"] = fed[0].sum(0)
    return items, {k: v.float().contiguous() for k, v in tensors.items()}, {"stopped_on_unyielded_im_end": bool(extra), **gaps}


def stage_speech(args: argparse.Namespace) -> None:
    for name in args.models:
        spec = fixture_specs()[name]
        d = model_dir(args, name)
        model, proc = load_reference(d)
        out = args.out / name / "speech"
        out.mkdir(parents=True, exist_ok=True)
        recordings = {}
        for label, system, user, loop in SPEECH_RECORDINGS:
            chat, pieces = speech_chat(args, proc, system, user)
            items, tensors, extra = record_generation(model, chat, loop, N_SPEECH_STEPS)
            summary = {**item_summary(items), **extra}
            recordings[label] = items
            save_tensors(out / f"{label}.safetensors", tensors)
            write_json(out / f"{label}.json", {
                "model": name,
                "prompt": pieces,
                **chat_layout(chat),
                "generate": {
                    "loop": f"generate_{loop}",
                    "max_new_tokens": N_SPEECH_STEPS,
                    "sampling": "greedy (all temperatures / top_k None)",
                    "interleaved_n_text": model.conf.interleaved_n_text,
                    "interleaved_n_audio": model.conf.interleaved_n_audio,
                    "items": items,
                    **summary,
                },
                "tensors": {k: list(v.shape) for k, v in tensors.items()},
            })
            log(f"{name} {label}: {summary}")
        if spec.detokenizer is not None or spec.mimi is not None:
            record_decode(args, spec, d, recordings[DECODE_SOURCE])


@torch.no_grad()
def record_decode(args: argparse.Namespace, spec: FixtureSpec, d: Path, items: list[dict]) -> None:
    from liquid_audio.processor import LFM2AudioProcessor

    frames = [it["audio"] for it in items if "audio" in it and 2048 not in it["audio"]][:DECODE_FRAMES]
    if len(frames) < DECODE_FRAMES:
        raise RuntimeError(f"{spec.name}: {DECODE_SOURCE} has fewer than {DECODE_FRAMES} audio frames")
    codes = torch.tensor(frames, dtype=torch.long).T.contiguous()  # [8, T]
    T = codes.shape[1]
    proc = LFM2AudioProcessor.from_pretrained(d, device="cpu")
    tensors: dict[str, torch.Tensor] = {"codes": codes}
    with reference_patches(spec):
        if spec.detokenizer is not None:
            detok = proc.audio_detokenizer
            rec = Recorder()
            rec.watch("emb", detok.emb, lambda o: o[0])
            rec.watch("lfm", detok.lfm, lambda o: o.last_hidden_state[0])
            rec.watch("lin", detok.lin)
            wav = proc.decode(codes[None])
            rec.close()
            # the split done in LFM2AudioDetokenizer.forward
            log_abs, angle = torch.chunk(rec.calls["lin"][0].mT.contiguous(), 2, 1)
            tensors.update({
                "detok.embedding": rec.calls["emb"][0],
                "detok.hidden": rec.calls["lfm"][0],
                "detok.log_abs": log_abs[0],
                "detok.angle": angle[0],
                "detok.waveform": wav[0],
            })
        if spec.mimi is not None:
            mimi = proc.mimi
            latent: list[torch.Tensor] = []
            orig = mimi.quantizer.decode

            def qdecode(c):
                y = orig(c)
                latent.append(y.clone())
                return y

            mimi.quantizer.decode = qdecode
            rec = Recorder()
            rec.watch("upsample", mimi.upsample, lambda o: o[0])
            rec.watch("transformer", mimi.decoder_transformer, lambda o: o[0][0])
            try:
                wav = mimi.decode(codes[None])
            finally:
                rec.close()
                del mimi.quantizer.decode
            with mimi.streaming(1):
                chunks = [mimi.decode(codes[None, :, t: t + 1]) for t in range(T)]
            tensors.update({
                "mimi.latent": latent[0][0],
                "mimi.upsampled": rec.calls["upsample"][0],
                "mimi.transformer": rec.calls["transformer"][0],
                "mimi.waveform": wav[0, 0],
                "mimi.waveform_streaming": torch.cat(chunks, -1)[0, 0],
            })
    tensors = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    out = args.out / spec.name / "speech"
    save_tensors(out / "decode.safetensors", tensors)
    stats = {k: {"shape": list(v.shape), "abs_max": float(v.abs().max()), "rms": float(v.float().pow(2).mean().sqrt())}
             for k, v in tensors.items() if v.is_floating_point()}
    stream_diff = float((tensors["mimi.waveform"] - tensors["mimi.waveform_streaming"]).abs().max()) \
        if spec.mimi is not None else None
    write_json(out / "decode.json", {
        "model": spec.name,
        "source": f"{DECODE_SOURCE}.json: its first {DECODE_FRAMES} audio frames without the code 2048, in order",
        "n_frames": T,
        "codes": codes.tolist(),
        "mimi_streaming_vs_batch_max_abs_diff": stream_diff,
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "stats": stats,
    })
    log(f"{spec.name} decode: T={T} " + ", ".join(f"{k} max {v['abs_max']:.3g} rms {v['rms']:.3g}"
                                                for k, v in stats.items() if "waveform" in k))

# --------------------------------------------------------------------------------------------


STAGES: dict[str, Callable[[argparse.Namespace], None]] = {
    "tokenizer": stage_tokenizer,
    "models": stage_models,
    "text": stage_text,
    "audio": stage_audio,
    "frontend": stage_frontend,
    "asr": stage_asr,
    "speech": stage_speech,
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
