"""The runtime contract: the least Python, torch and transformers the worker runs on (pure; no
torch). Both sides read these numbers: the worker checks its own interpreter at start, the
bootstrap refuses an image that cannot meet them before any stage starts, and `orch plan` runs
the same check on a box.

Why these floors (transformers 5.x's own metadata and loading code):
- transformers 5 needs torch >= 2.6: below it, it only logs "Disabling PyTorch because PyTorch
  >= 2.6 is required" and every model class then fails (`transformers/utils/import_utils.py`,
  `is_torch_available`); its metadata says `torch>=2.6` (`Requires-Dist`).
- transformers 5 needs Python >= 3.11 (`Requires-Python: >=3.11.0`): on an older Python pip
  quietly picks 4.57.x, which has no `ministral3` model type (the Ministral 3 decoder).
- `ministral3` ships with transformers 5.

    problems = check_versions(python="3.10.12", torch="2.5.1+cu124", transformers=None)
    # ['python 3.10.12 is older than 3.11 ...', 'torch 2.5.1+cu124 is older than 2.6 ...', ...]
"""

from __future__ import annotations

import re

MIN_PYTHON = (3, 11)
MIN_TORCH = (2, 6)
MIN_TRANSFORMERS = (5, 0)

#: The default Vast image (docs/vast.md says why): torch 2.6.0 (CUDA 12.4) on conda's Python 3.11.
DEFAULT_IMAGE = "pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime"


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """`2.5.1+cu124` -> (2, 5, 1); `5.0.0rc1` -> (5, 0, 0); None for nothing usable."""
    if not text:
        return None
    m = re.match(r"\s*(\d+(?:\.\d+)*)", text)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def _floor(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


def python_problem(version: str | None) -> str | None:
    """One line saying why this Python cannot run the worker, with the fix; None when it can."""
    v = parse_version(version)
    if v is None:
        return "python: version unknown (the interpreter did not report one)"
    if v[:2] < MIN_PYTHON:
        return (
            f"python {version} is older than {_floor(MIN_PYTHON)}, which transformers 5 needs "
            f"(pip would fall back to 4.57, which has no ministral3): use an image with "
            f"Python >= {_floor(MIN_PYTHON)}, e.g. image = {DEFAULT_IMAGE!r}"
        )
    return None


def torch_problem(version: str | None, *, required: bool = True) -> str | None:
    """One line saying why this torch cannot run the worker; None when it can (or when there is
    none and `required` is false: the bootstrap then installs the pinned one)."""
    v = parse_version(version)
    if v is None:
        if not required:
            return None
        return f"torch is not installed: use an image with torch >= {_floor(MIN_TORCH)}"
    if v[:2] < MIN_TORCH:
        return (
            f"torch {version} is older than {_floor(MIN_TORCH)}, which transformers 5 needs (it "
            f"disables torch below that and no model loads): use an image with torch >= "
            f"{_floor(MIN_TORCH)}, e.g. image = {DEFAULT_IMAGE!r}"
        )
    return None


def transformers_problem(version: str | None, *, required: bool = True) -> str | None:
    """One line saying why this transformers cannot load the study's model; None when it can."""
    v = parse_version(version)
    if v is None:
        return (
            "transformers is not installed: run `orch up` / bootstrap again" if required else None
        )
    if v[:2] < MIN_TRANSFORMERS:
        return (
            f"transformers {version} is older than {_floor(MIN_TRANSFORMERS)} and has no "
            f"ministral3: reinstall the worker extra (pip install -e '.[worker]')"
        )
    return None


#: Image tags whose torch version is in the tag: the official images (`pytorch/pytorch:2.6.0-
#: cuda12.4-cudnn9-runtime`) and Vast's (`vastai/pytorch:2.6.0-cuda-12.4.1-py311-...`).
_IMAGE_TORCH = re.compile(
    r"^(?:docker\.io/)?(?:pytorch/pytorch|vastai/pytorch):v?(\d+\.\d+(?:\.\d+)?)"
)


def image_torch(image: str) -> str | None:
    """The torch version an image's tag names, for the image families that name it; None for
    any other image (then only the box itself can tell: the bootstrap checks it there)."""
    m = _IMAGE_TORCH.match(image.strip())
    return m.group(1) if m else None


def image_problem(image: str) -> str | None:
    """One line when an image's tag already shows a torch below the contract (checked before
    anything is rented); None when it does not, or cannot tell."""
    version = image_torch(image)
    problem = torch_problem(version, required=False) if version else None
    return f"image {image!r}: {problem}" if problem else None


def check_versions(
    *,
    python: str | None,
    torch: str | None,
    transformers: str | None,
    torch_required: bool = True,
    transformers_required: bool = True,
) -> list[str]:
    """Every contract problem of an environment, one line each (empty: it meets the contract)."""
    found = [
        python_problem(python),
        torch_problem(torch, required=torch_required),
        transformers_problem(transformers, required=transformers_required),
    ]
    return [p for p in found if p]
