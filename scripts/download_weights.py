#!/usr/bin/env python
"""Download the public evaluation weights into a folder, verifying each file's SHA-256 and size.

    python scripts/download_weights.py ../shared/weights            # both I3D files
    python scripts/download_weights.py ~/weights --only i3d_pretrained_400.pt
    python scripts/download_weights.py ~/weights --list             # print URLs and sums, download nothing

Then point the evaluation at the folder (``mardini-eval --weights-dir``, the trainer's ``train.eval_weights_dir``,
or ``$MARDINI_WEIGHTS``; the default is ``../shared/weights/``). The project never downloads anything by itself;
this script is run by hand, on a machine with internet access. Each file is written to a temporary name and
renamed only after its checksum matches; mirrors are tried in order until one gives the expected bytes.

Where the sums come from: both files are stored with Git LFS in the Open-Sora-Plan v1.0.0 tree (the
``camenduru/Open-Sora-Plan-v1.0.0-hf`` copy, ``opensora/eval/fvd/{videogpt,styleganv}/``), whose LFS pointers
give the SHA-256 and size below. Those are the copies of the originals distributed by VideoGPT
(i3d_pretrained_400.pt) and StyleGAN-V (i3d_torchscript.pt); I found no checksum published by the original
authors, so a download from an original host that differs byte-for-byte is reported (size and sum) and rejected
unless ``--no-verify`` is given.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

# The Hugging Face space of Open-Sora-Plan v1.0.0; the revision is the one JavisBench's README links for
# i3d_pretrained_400.pt (the styleganv file is assumed to be in the same tree; "main" is tried after it).
_SPACE = "https://huggingface.co/spaces/LanguageBind/Open-Sora-Plan-v1.0.0/resolve"
HF_PINNED = f"{_SPACE}/810fa8c4bdb3a4c8eec9bd57375c29bde6fb46de/opensora/eval/fvd"
HF_MAIN = f"{_SPACE}/main/opensora/eval/fvd"

WEIGHTS = {
    "i3d_pretrained_400.pt": {
        "what": "I3D Kinetics-400 RGB state_dict, converted from TF-hub deepmind/i3d-kinetics-400/1 "
                "(VideoGPT / TATS FVD); loaded by mardini.evaluation.i3d.InceptionI3d",
        "sha256": "55095f049e706479d48e221adcdb145b2b9dc930ba28b081ed72367ffaa32343",
        "size": 50_939_526,
        "urls": [
            f"{HF_PINNED}/videogpt/i3d_pretrained_400.pt",
            f"{HF_MAIN}/videogpt/i3d_pretrained_400.pt",
            # VideoGPT's Google Drive file (videogpt/download.py: _I3D_PRETRAINED_ID); large files may answer with a
            # confirmation page instead of the bytes, which the checksum catches
            "https://drive.google.com/uc?export=download&id=1mQK8KD8G6UWRa5t87SRMm5PVXtlpneJT",
            # the OneDrive link in common_metrics_on_video_quality's README
            "https://onedrive.live.com/download?cid=78EEF3EB6AE7DBCB&resid=78EEF3EB6AE7DBCB%21199"
            "&authkey=AApKdFHPXzWLNyI",
        ],
    },
    "i3d_torchscript.pt": {
        "what": "StyleGAN-V's TorchScript port of the TF-hub I3D (src/metrics/frechet_video_distance.py)",
        "sha256": "bec6519f66ea534e953026b4ae2c65553c17bf105611c746d904657e5860a5e2",
        "size": 51_235_320,
        "urls": [
            "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1",  # StyleGAN-V's detector_url
            f"{HF_PINNED}/styleganv/i3d_torchscript.pt",
            f"{HF_MAIN}/styleganv/i3d_torchscript.pt",
        ],
    },
}


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, spec: dict) -> tuple[bool, str]:
    size, digest = path.stat().st_size, sha256_of(path)
    ok = digest == spec["sha256"] and size == spec["size"]
    return ok, f"size {size} (expected {spec['size']}), sha256 {digest} (expected {spec['sha256']})"


def fetch(url: str, dest: Path, timeout: float = 60.0) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "mardini-download-weights"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def download(name: str, folder: Path, check: bool = True) -> Path:
    spec = WEIGHTS[name]
    target = folder / name
    if target.is_file():
        ok, detail = verify(target, spec)
        if ok or not check:
            print(f"{name}: already present ({detail})")
            return target
        print(f"{name}: present but does not verify ({detail}); downloading again")
    errors = []
    for url in spec["urls"]:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            print(f"{name}: {url}")
            fetch(url, tmp)
            ok, detail = verify(tmp, spec)
            if not ok and check:
                errors.append(f"{url}: {detail}")
                continue
            os.replace(tmp, target)
            print(f"{name}: ok ({detail})")
            return target
        except Exception as exc:  # noqa: BLE001 - try the next mirror
            errors.append(f"{url}: {exc}")
        finally:
            tmp.unlink(missing_ok=True)
    raise RuntimeError(f"{name}: no mirror gave the expected file:\n  " + "\n  ".join(errors))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="where to write the weights (created if needed)")
    p.add_argument("--only", nargs="*", choices=sorted(WEIGHTS), default=None, help="download only these files")
    p.add_argument("--list", action="store_true", help="print the files, URLs and checksums; download nothing")
    p.add_argument("--no-verify", action="store_true", help="keep a download whose checksum differs")
    args = p.parse_args(argv)
    names = args.only or sorted(WEIGHTS)
    if args.list:
        for name in names:
            spec = WEIGHTS[name]
            print(f"{name}\n  {spec['what']}\n  sha256 {spec['sha256']}  size {spec['size']}")
            for url in spec["urls"]:
                print(f"  {url}")
        return 0
    folder = Path(args.folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        try:
            download(name, folder, check=not args.no_verify)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
