"""The device compile checks of the CUDA kernel headers, no GPU needed (tests/cuda): nvcc through
ptxas for the target architectures, the PTX the contract's arithmetic rules out, and register
spills (ptxas -v).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

#: the architectures the device check compiles for (sm_80: mma.sync / cp.async; sm_90a: Hopper).
NVCC_ARCHS = ("80", "90a")

#: PTX the contract's arithmetic rules out: approximate or flush-to-zero instructions, and plain
#: (contractible) fp32 operations - every one must be an explicitly rounded _rn wrapper.
FORBIDDEN_PTX = {
    r"\.approx|\.ftz": "approximate / flush-to-zero instruction",
    r"\b(add|sub|mul|fma|div|sqrt)\.f32\b": "fp32 operation without explicit rounding",
}


def nvcc() -> str | None:
    """The nvcc on PATH, or None."""
    return shutil.which("nvcc")


def _ptx_body(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("//"))


def _run_nvcc(args: list[str]) -> str:
    exe = nvcc()
    if exe is None:
        raise RuntimeError("nvcc not on PATH")
    proc = subprocess.run([exe, "-std=c++17", *args], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(args)}):\n{proc.stderr[-4000:]}")
    return proc.stderr


def _spilling_kernels(ptxas_verbose: str, allowed: dict[str, int] | None = None) -> list[str]:
    """The entries of ``ptxas -v`` output that spill registers to local memory, except entries
    whose name contains a key of `allowed` and spill at most that many bytes."""
    found = []
    for section in ptxas_verbose.split("Compiling entry function ")[1:]:
        name = section.split(maxsplit=1)[0]
        stores = re.search(r"(\d+) bytes spill stores", section)
        spilled = int(stores.group(1)) if stores else 0
        limit = max((v for k, v in (allowed or {}).items() if k in name), default=0)
        if spilled > limit:
            arch = section.split(" for ", 1)[1].split(maxsplit=1)[0]
            found.append(f"{name} ({arch}): {spilled} bytes spill stores")
    return found


def nvcc_compile(source: Path, workdir: Path, archs: tuple[str, ...] = NVCC_ARCHS,
                 allowed_spill_bytes: dict[str, int] | None = None) -> dict[str, str]:
    """``nvcc -c`` of ``source`` for each ``sm_<arch>`` (through ptxas, as the extension build);
    returns each arch's PTX without comment lines. Raises RuntimeError with nvcc's errors, and
    when ptxas spills a kernel's registers to local memory (a performance bug), except kernels
    named in `allowed_spill_bytes` (name part -> bytes; the caller states why it is harmless)."""
    source = Path(source)
    keep = Path(workdir) / f"keep-{source.stem}"
    keep.mkdir(parents=True, exist_ok=True)
    gencode = [a for arch in archs for a in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    verbose = _run_nvcc([*gencode, "-c", str(source), "-o", str(keep / f"{source.stem}.o"), "-keep",
                         "-keep-dir", str(keep), "-Xptxas", "-v"])
    spills = _spilling_kernels(verbose, allowed_spill_bytes)
    if spills:
        raise RuntimeError(f"ptxas spills registers in {source.name}:\n" + "\n".join(spills))
    return {arch: _ptx_body((keep / f"{source.stem}.compute_{arch}.ptx").read_text()) for arch in archs}


def nvcc_ptx(source: Path, arch: str, *, fmad: bool = True, workdir: Path | None = None) -> str:
    """The PTX of ``source`` for ``compute_<arch>`` (``nvcc -ptx``, ``-fmad=<fmad>``) without
    comment lines. Raises RuntimeError with nvcc's errors."""
    import tempfile

    source = Path(source)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        out = Path(tmp) / f"{source.stem}.ptx"
        _run_nvcc([f"-arch=compute_{arch}", "-ptx", f"-fmad={'true' if fmad else 'false'}", str(source), "-o",
                   str(out)])
        return _ptx_body(out.read_text())


def ptx_violations(body: str) -> list[str]:
    """What :data:`FORBIDDEN_PTX` finds in a PTX body: ``"<reason>: <instruction line>"`` each."""
    found = []
    for pattern, reason in FORBIDDEN_PTX.items():
        found += [f"{reason}: {line.strip()}" for line in body.splitlines() if re.search(pattern, line)]
    return found
