"""nnU-Net path variables, with the nnU-Net v1 names as fallbacks.

nnunetv2 2.8 reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` from the environment
lazily; older 2.x releases read them once at import. Entry points call :func:`setup_paths` before importing
nnunetv2 so both behave the same.
Precedence: command-line flag > v2 variable > v1 variable.
"""
import os

from nnpp import NnppError

# v2 name -> v1 fallback name(s)
V1_FALLBACKS = {
    "nnUNet_raw": ("nnUNet_raw_data_base",),
    "nnUNet_preprocessed": (),  # same name in v1
    "nnUNet_results": ("RESULTS_FOLDER",),
}


def resolve_path(name: str, override: str | None = None) -> str | None:
    if override:
        return os.path.abspath(override)
    for var in (name,) + V1_FALLBACKS[name]:
        value = os.environ.get(var)
        if value:
            return os.path.abspath(value)
    return None


def setup_paths(raw: str | None = None, preprocessed: str | None = None, results: str | None = None,
                required: tuple[str, ...] = ("nnUNet_preprocessed", "nnUNet_results")) -> dict[str, str | None]:
    """Resolve the three folders, export them for nnunetv2 and check that ``required`` ones are set."""
    overrides = {"nnUNet_raw": raw, "nnUNet_preprocessed": preprocessed, "nnUNet_results": results}
    resolved = {k: resolve_path(k, v) for k, v in overrides.items()}
    missing = [k for k in required if not resolved[k]]
    if missing:
        hints = ", ".join(f"{k} (or {'/'.join(V1_FALLBACKS[k])})" if V1_FALLBACKS[k] else k for k in missing)
        raise NnppError(f"nnU-Net path variable(s) not set: {hints}; export them, or pass "
                        f"--preprocessed/--results where the command has them")
    for k, v in resolved.items():
        if v:
            os.environ[k] = v
    return resolved
