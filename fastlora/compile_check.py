"""``python -m fastlora compile-check``: ahead-of-time GPU compilation report, no GPU needed.

For every requested architecture (default sm_80 and sm_90) this compiles

* every Triton kernel configuration registered by the ``fastlora.kernels`` modules (each module's
  ``compile_specs()``, see ``fastlora.kernels.CompileSpec``) with
  ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cap, 32))``,
  then runs Triton's bundled ``ptxas -v`` on the produced PTX for the resource report;
* every CUDA source ``csrc/cuda/*.cu`` of the source tree with
  ``nvcc -c -arch=sm_XX -std=c++17 -O3 --fmad=false -Xptxas -v -I csrc/include`` (the flags of the
  extension build in setup.py), one row per kernel that ptxas reports.

It prints a table (kernel, config, arch, registers, spills, shared memory, tensor-core instructions,
status) and exits with status 1 when anything fails to compile, spills registers or contains an
instruction its spec forbids (e.g. an FMA where two roundings are required); 0 otherwise. Parts
whose tools are missing (no Triton, no nvcc, no ``csrc/`` in an installed wheel) are reported as
skipped with the reason and do not fail the check.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["Row", "build_parser", "main", "run_checks"]

DEFAULT_ARCHS = "sm_80,sm_90"

# Tensor-core instructions in PTX, most specific first.
_TENSOR_CORE_PTX = (
    ("tcgen05", re.compile(r"\btcgen05\.mma")),
    ("wgmma", re.compile(r"\bwgmma\.")),
    ("mma", re.compile(r"\bmma\.(?:sync|sp)")),
)

_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(.*)")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class Row:
    """One line of the report (and one object of the --json output).

    backend: "triton" | "cuda"; kernel: kernel name; config: configuration label (Triton) or source
    file (CUDA); arch: "sm_80", ...; registers / spill_stores / spill_loads / stack / shared: ptxas
    figures in registers and bytes (shared = Triton's dynamic shared memory + static smem); None when
    unknown. tensor_cores: "wgmma" | "mma" | "tcgen05" | "no" (from the PTX); status: "ok" | "failed"
    | "skipped"; reason: why it failed or was skipped; checks: extra checks that passed.
    """

    backend: str
    kernel: str
    config: str
    arch: str
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    tensor_cores: str | None = None
    status: str = "ok"
    reason: str = ""
    checks: list[str] = field(default_factory=list)

    def fail(self, reason: str) -> None:
        self.status = "failed"
        self.reason = f"{self.reason}; {reason}" if self.reason else reason


def _parse_arch(text: str) -> tuple[int, str]:
    """'sm_90' | 'sm90' | '90' | 'sm_90a' -> (90, 'sm_90' or 'sm_90a')."""
    m = re.fullmatch(r"(?:sm_?)?(\d{2,3})(a?)", text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad architecture {text!r}: expected e.g. sm_80, sm_90")
    cap = int(m.group(1))
    return cap, f"sm_{cap}{m.group(2)}"


def _tensor_cores(ptx: str) -> str:
    for name, pattern in _TENSOR_CORE_PTX:
        if pattern.search(ptx):
            return name
    return "no"


def _parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """ptxas -v log -> {mangled entry name: {registers, stack, spill_stores, spill_loads, smem}}."""
    out: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            current = out.setdefault(m.group(1), {"smem": 0})
            continue
        if current is None:
            continue
        m = _PTXAS_PROPS.search(line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
            continue
        m = _PTXAS_USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            smem = _PTXAS_SMEM.search(m.group(2))
            if smem:
                current["smem"] = int(smem.group(1))
    return out


def _fill_resources(row: Row, res: dict[str, int], extra_shared: int = 0) -> None:
    row.registers = res.get("registers")
    row.stack = res.get("stack")
    row.spill_stores = res.get("spill_stores")
    row.spill_loads = res.get("spill_loads")
    row.shared = res.get("smem", 0) + extra_shared
    if row.registers is None:
        row.fail("no register count in the ptxas report")
    if (row.spill_stores or 0) > 0 or (row.spill_loads or 0) > 0:
        row.fail(f"spills registers ({row.spill_stores} B stores, {row.spill_loads} B loads)")


def _short_error(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


# --------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------


def _triton_ptxas(cap: int) -> tuple[str | None, str]:
    """Path of the ptxas Triton uses for ``cap`` and its --gpu-name (Triton targets sm_90a on Hopper)."""
    gpu_name = f"sm_{cap}{'a' if cap >= 90 else ''}"
    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        return get_ptxas(cap).path, sm_arch_from_capability(cap)
    except Exception:  # older/newer Triton layouts: fall back to a ptxas on the PATH
        return shutil.which("ptxas"), gpu_name


def _triton_rows_in_fresh_process(archs: list[tuple[int, str]], notes: list[str], verbose: bool) -> list[Row]:
    """The Triton rows of ``python -m fastlora.compile_check --no-cuda`` run without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="fastlora-cc-") as workdir:
        report = Path(workdir) / "triton.json"
        cmd = [sys.executable, "-m", "fastlora.compile_check", "--no-cuda", "--json", str(report),
               "--arch", ",".join(arch for _, arch in archs), *(["--verbose"] if verbose else [])]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=None if verbose else subprocess.PIPE,
                              text=True)
        if not report.exists():
            reason = f"the fresh compile-check process exited with {proc.returncode}: {(proc.stderr or '')[-300:]}"
            return [Row("triton", "*", "*", arch, status="failed", reason=reason) for _, arch in archs]
        data = json.loads(report.read_text())
    notes += data["notes"]
    return [Row(**row) for row in data["rows"]]


def _run_ptxas(ptxas: str, gpu_name: str, ptx: str, fmad: bool, workdir: str) -> str:
    src = os.path.join(workdir, "kernel.ptx")
    with open(src, "w") as f:
        f.write(ptx)
    base = [ptxas, "-v", f"--gpu-name={gpu_name}", src, "-o", os.path.join(workdir, "kernel.cubin")]
    if not fmad:
        base.insert(1, "--fmad=false")
    # Triton 3.9 adds --regAllocOptLevel=2 (a ptxas 13 workaround); mirror it so the register
    # count is the one of the cubin Triton builds, and drop it for a ptxas that does not know it.
    for cmd in (base[:1] + ["--regAllocOptLevel=2"] + base[1:], base):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            return proc.stdout + proc.stderr
    raise RuntimeError(f"ptxas failed: {(proc.stdout + proc.stderr).strip()[-500:]}")


def _triton_rows(archs: list[tuple[int, str]], notes: list[str], verbose: bool) -> list[Row]:
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        # Under the interpreter every @triton.jit function this process has imported (Triton's own
        # tl.cdiv & co., through `import torch`) is a Python one that cannot be compiled.
        notes.append("TRITON_INTERPRET was set: the Triton kernels were compiled in a fresh process without it")
        return _triton_rows_in_fresh_process(archs, notes, verbose)
    try:
        import triton
        from triton.backends.compiler import BaseBackend, GPUTarget
        from triton.compiler import ASTSource
    except Exception as exc:
        notes.append(f"Triton kernels skipped: Triton is not importable ({_short_error(exc)})")
        return [Row("triton", "*", "*", a, status="skipped", reason="Triton not importable") for _, a in archs]

    try:
        from fastlora.kernels import all_compile_specs

        specs = all_compile_specs()
    except Exception as exc:
        return [Row("triton", "<import>", "*", a, status="failed", reason=_short_error(exc)) for _, a in archs]
    notes.append(f"Triton {triton.__version__}: {len(specs)} kernel configurations")

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fastlora-cc-") as workdir:
        for cap, arch in archs:
            ptxas, gpu_name = _triton_ptxas(cap)
            target = GPUTarget("cuda", cap, 32)
            for spec in specs:
                row = Row("triton", spec.kernel, spec.config, arch)
                rows.append(row)
                if not isinstance(spec.fn, triton.runtime.JITFunction):
                    row.fail("kernel was defined under TRITON_INTERPRET=1; run the check in a fresh process")
                    continue
                names = list(spec.signature)
                attrs = {(names.index(p),): BaseBackend.parse_attr("D") for p in spec.aligned}
                options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, **spec.options}
                try:
                    src = ASTSource(spec.fn, dict(spec.signature), dict(spec.constexprs), attrs)
                    compiled = triton.compile(src, target=target, options=options)
                    ptx = compiled.asm["ptx"]
                except Exception as exc:
                    row.fail(f"Triton compile error: {_short_error(exc)}")
                    continue
                row.tensor_cores = _tensor_cores(ptx)
                for label, pattern in spec.forbid_ptx.items():
                    m = re.search(pattern, ptx)
                    if m:
                        row.fail(f"forbidden PTX instruction {m.group(0)!r} ({label})")
                    else:
                        row.checks.append(f"no {label}")
                if ptxas is None:
                    row.fail("no ptxas found for the resource report")
                    continue
                try:
                    log = _run_ptxas(ptxas, gpu_name, ptx, bool(compiled.metadata.enable_fp_fusion), workdir)
                except Exception as exc:
                    row.fail(_short_error(exc))
                    continue
                if verbose:
                    print(f"[{arch}] {spec.kernel} {spec.config}\n{log}", file=sys.stderr)
                entries = _parse_ptxas(log)
                res = entries.get(compiled.metadata.name) or next(iter(entries.values()), {})
                _fill_resources(row, res, extra_shared=int(compiled.metadata.shared))
    return rows


# --------------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------------


def _repo_root() -> Path | None:
    """The source tree next to the package (editable install / checkout), or None for a wheel."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "csrc").is_dir() else None


def _find_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return None


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    try:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        demangled = out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}
    if len(demangled) != len(names):
        return {n: n for n in names}
    # Drop the parameter list (the config column names the source) and nvcc's per-file names for
    # anonymous namespaces.
    result = {}
    for name, pretty in zip(names, demangled, strict=True):
        pretty = re.sub(r"_GLOBAL__N__\w+::|\(anonymous namespace\)::", "", pretty)
        pretty = re.sub(r"^void ", "", pretty)
        depth, cut = 0, len(pretty)
        for i, ch in enumerate(pretty):  # first '(' outside template brackets starts the parameters
            if ch == "<":
                depth += 1
            elif ch == ">":
                depth -= 1
            elif ch == "(" and depth == 0:
                cut = i
                break
        result[name] = pretty[:cut]
    return result


def _ptx_entries(ptx: str) -> dict[str, str]:
    """PTX text -> {entry name: its body} (for per-kernel tensor-core detection)."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"\.entry\s+(\w+)", ptx)]
    return {name: ptx[s : (starts[i + 1][0] if i + 1 < len(starts) else len(ptx))]
            for i, (s, name) in enumerate(starts)}  # fmt: skip


def _compile_cu(nvcc: str, source: Path, root: Path, cap: int, arch: str) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="fastlora-cc-") as workdir:
        cmd = [
            nvcc, "-c", str(source), "-o", os.path.join(workdir, source.stem + ".o"),
            f"-arch={arch}", "-std=c++17", "-O3", "--fmad=false",
            "-Xptxas", "-v", "-I", str(root / "csrc" / "include"),
            "--keep", "--keep-dir", workdir,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            tail = " ".join(log.strip().splitlines()[-6:])
            return [Row("cuda", "<compile>", source.name, arch, status="failed",
                        reason=f"nvcc exit {proc.returncode}: {tail[-600:]}")]  # fmt: skip
        ptx_files = sorted(Path(workdir).glob("*.ptx"))
        ptx = "\n".join(p.read_text() for p in ptx_files)
    entries = _parse_ptxas(log)
    bodies = _ptx_entries(ptx)
    pretty = _demangle(sorted(entries))
    rows = []
    for mangled in sorted(entries, key=lambda n: pretty[n]):
        row = Row("cuda", pretty[mangled], source.name, arch)
        row.tensor_cores = _tensor_cores(bodies[mangled]) if mangled in bodies else None
        _fill_resources(row, entries[mangled])
        rows.append(row)
    if not rows:
        rows.append(Row("cuda", "<none>", source.name, arch, status="ok", reason="no __global__ kernels"))
    return rows


def _cuda_jobs(archs, notes, pool) -> list[concurrent.futures.Future] | list[Row]:
    root = _repo_root()
    if root is None:
        notes.append("CUDA sources unavailable: no csrc/ next to the package (installed wheel?)")
        return [Row("cuda", "*", "*", a, status="skipped", reason="CUDA sources not available") for _, a in archs]
    sources = sorted((root / "csrc" / "cuda").glob("*.cu"))
    if not sources:
        notes.append(f"no CUDA sources in {root / 'csrc' / 'cuda'}")
        return []
    nvcc = _find_nvcc()
    if nvcc is None:
        notes.append("CUDA kernels skipped: nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
        return [Row("cuda", "*", s.name, a, status="skipped", reason="nvcc not found")
                for s in sources for _, a in archs]  # fmt: skip
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    notes.append(f"nvcc: {version[-1] if version else nvcc}; {len(sources)} CUDA source(s)")
    return [pool.submit(_compile_cu, nvcc, s, root, cap, arch) for s in sources for cap, arch in archs]


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def run_checks(
    archs: list[tuple[int, str]], *, triton: bool = True, cuda: bool = True, verbose: bool = False
) -> tuple[list[Row], list[str]]:
    """Compile everything for ``archs`` ([(80, "sm_80"), ...]). Returns (rows, notes)."""
    notes: list[str] = []
    rows: list[Row] = []
    # nvcc runs in worker threads (separate processes) while Triton compiles in this thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, (os.cpu_count() or 2) // 2))) as pool:
        jobs = _cuda_jobs(archs, notes, pool) if cuda else []
        if triton:
            rows += _triton_rows(archs, notes, verbose)
        for job in jobs:
            rows += job.result() if isinstance(job, concurrent.futures.Future) else [job]
    return rows, notes


def _format_table(rows: list[Row]) -> str:
    header = ("kernel", "config", "arch", "regs", "spills (st/ld B)", "smem B", "tensor cores", "status")
    lines = []
    for r in rows:
        spills = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        status = r.status if not r.reason else f"{r.status}: {r.reason}"
        if r.status == "ok" and r.checks:
            status += f" ({', '.join(r.checks)})"
        lines.append((
            f"{r.backend}:{r.kernel}", r.config, r.arch, "-" if r.registers is None else str(r.registers),
            spills, "-" if r.shared is None else str(r.shared), r.tensor_cores or "-", status,
        ))  # fmt: skip
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    widths[-1] = 0  # the status column is last: never pad it
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    out = [fmt.format(*header).rstrip(), fmt.format(*("-" * max(w, 6) for w in widths)).rstrip()]
    out += [fmt.format(*line).rstrip() for line in lines]
    return "\n".join(out)


def build_parser(prog: str = "python -m fastlora compile-check") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Compile fastlora's GPU kernels ahead of time, without a GPU, and report per kernel and "
            "architecture: registers, register spills, shared memory and whether tensor-core "
            "instructions (wgmma / mma) appear in the PTX. Covers every Triton kernel configuration "
            "registered in fastlora.kernels (compiled with triton.compile for a GPUTarget, resources "
            "from Triton's bundled ptxas -v) and every csrc/cuda/*.cu source of the source tree "
            "(nvcc -c -arch=sm_XX -std=c++17 -O3 --fmad=false -Xptxas -v)."
        ),
        epilog=(
            "Exit status: 0 when everything that could be checked compiled without spills or "
            "forbidden instructions (missing nvcc / Triton / sources are reported as skipped); 1 "
            "when a kernel failed to compile, spilled registers or failed a check; 2 on bad usage."
        ),
    )
    parser.add_argument(
        "--arch",
        default=DEFAULT_ARCHS,
        help=f"comma-separated target architectures, e.g. sm_80,sm_90 (default: {DEFAULT_ARCHS})",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH ('-' for stdout)")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA sources")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every ptxas log to stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the compile check; ``argv`` are the arguments after ``compile-check``. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        archs = list(dict.fromkeys(_parse_arch(a) for a in args.arch.split(",") if a.strip()))
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if not archs:
        parser.error("--arch: no architecture given")

    t0 = time.perf_counter()
    rows, notes = run_checks(archs, triton=not args.no_triton, cuda=not args.no_cuda, verbose=args.verbose)
    elapsed = time.perf_counter() - t0
    failed = [r for r in rows if r.status == "failed"]
    n_ok = sum(r.status == "ok" for r in rows)
    n_skipped = sum(r.status == "skipped" for r in rows)

    print(_format_table(rows))
    for note in notes:
        print(f"note: {note}")
    print(f"{n_ok} ok, {len(failed)} failed, {n_skipped} skipped in {elapsed:.1f} s")
    if args.json:
        report = {
            "archs": [a for _, a in archs],
            "rows": [asdict(r) for r in rows],
            "notes": notes,
            "ok": not failed,
            "seconds": round(elapsed, 2),
        }
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
