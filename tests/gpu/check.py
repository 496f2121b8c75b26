"""The build's GPU path on one lent GPU, in one call that ends with its table inside its budget; and its CPU rehearsal.

    bash tests/gpu/fetch_wheels.sh          # here, once: the wheels the GPU image lacks, into .gpu-wheels/ (ignored)
    bash tests/gpu/check.sh                 # there, .gpu-wheels carried: 8 minutes at most, table at the end
    python tests/gpu/check.py --rehearsal   # here, on the CPU (CI runs it): the same plumbing on a tiny Phi-3

Phases, in order; each gets what is left of one global budget (at most its own cap), a phase that runs over is cut
(its processes killed) and the next one starts, and the table is printed whatever happened:

1. install   the carried wheels (.gpu-wheels/) into WORK/site, first on PYTHONPATH. The rehearsal installs nothing.
2. gate      every package build/requirements.txt pins against what is importable, in seconds: the packages whose
             APIs the build calls must be the pinned versions, or the check stops with one line (a GPU is lent for 15
             minutes; a TypeError after the model has loaded would spend it). On CUDA also: bitsandbytes has a
             library for torch's CUDA.
3. base      Phi-3.5-mini's exact shape with random weights (tiny Phi-3 in the rehearsal), built from its config as
             the recipe's random_init does, through the data stage on the shipped oasst1 sample.
4. bench     tests/benchmarks/bench_training.py, plain QLoRA shape against the default recipe on the oasst rows, in
             train mode; compile status, recompiles and graph breaks (TORCH_LOGS) in each row.
5. train     the default recipe's data,train for a few dozen steps, killed once its first checkpoint is complete and
             started again: it must resume from that checkpoint.
6. cpu       merge, export (and quantize, evaluate where llama-cpp-python is installed): CPU stages the suite already
             runs on tiny Phi-3; only if time is left.

Results stream into OUT as they come (check.json after every phase, each phase's log as it is written), so a call cut
off from outside still returns what was measured. Exit status: 0 when every phase that ran passed, 3 when the gate
stopped the check, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "data" / "oasst1-sample" / "train.jsonl"
REQUIREMENTS = ROOT / "build" / "requirements.txt"
RESERVE_S = 5  # kept back from every phase for writing check.json and printing the table

# Pinned for the CPU machine where the suite runs; a GPU machine brings its own builds (torch for its CUDA), and the
# build does not depend on their exact versions. Reported, never fatal.
MACHINE_OWN = {"torch", "numpy", "sentencepiece", "protobuf", "pyyaml", "tqdm", "matplotlib", "tensorboard"}
# The Space's runtime and the GGUF reader: used only by stages the check skips where they are missing.
OPTIONAL = {"gradio", "llama-cpp-python", "llama-cpp-agent", "requests", "gguf"}
# Every other pin is a package whose API the build calls (transformers, trl, peft, bitsandbytes, accelerate,
# datasets, huggingface_hub, safetensors): it must be the pinned version.


class Plan:
    """What differs between the GPU check and its rehearsal: recipe, model, step counts and phase caps (seconds)."""

    def __init__(self, rehearsal: bool):
        self.rehearsal = rehearsal
        if rehearsal:
            self.recipe, self.max_length = str(ROOT / "tests" / "data" / "recipes" / "tiny-phi3.yaml"), 128
            self.bench_steps, self.log_every, self.save_steps = 8, 2, 4
            # The tiny recipe is unpacked; the default recipe's packing and checkpointing go on top. Not its
            # compiled layers: inductor on 2 CPU cores recompiles for each new packed length, ~30 s each.
            self.recipe_sets = ["packing=true", "gradient_checkpointing=true"]
            self.caps = {"install": 60, "gate": 60, "base": 120, "bench": 150, "train": 150, "cpu": 150}
            self.floors = {"install": 5, "gate": 5, "base": 15, "bench": 20, "train": 20, "cpu": 20}
            self.budget = 420
        else:
            self.recipe, self.max_length = "phi35-oasst1", 2048
            # 30 steps, a log mark every 5: the second half (15 steps, 3 syncs) is timed.
            self.bench_steps, self.log_every, self.save_steps = 30, 5, 10
            self.recipe_sets = []
            # The gate's imports took 21-25 s on a warm H200 machine and over 30 s on a cold one (2026-12-04).
            self.caps = {"install": 60, "gate": 60, "base": 150, "bench": 240, "train": 180, "cpu": 180}
            # Below these a phase is not started: it could not even load its model (a 4-bit Phi-3.5 load is ~30 s).
            self.floors = {"install": 10, "gate": 5, "base": 60, "bench": 90, "train": 90, "cpu": 60}
            self.budget = 480


class Cut(Exception):
    """A phase ran past its share of the budget; its processes were killed."""


class Check:
    def __init__(self, plan: Plan, out: Path, work: Path, budget: float, caps: dict):
        self.plan, self.out, self.work = plan, out, work
        self.start = time.monotonic()
        self.deadline = self.start + budget
        self.caps = {**plan.caps, **caps}
        self.phase_end = self.deadline
        self.results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": budget,
                              "rehearsal": plan.rehearsal, "machine": platform.node(), "phases": {}}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PHI35_OASST1_CACHE": str(work / "cache"), "BENCH_WORK": str(work)}
        self.base = work / "e2e" / "base"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, text: str) -> None:
        print(f"[check {self.elapsed():4.0f} s] {text}", flush=True)

    def save(self) -> None:
        (self.out / "check.json").write_text(json.dumps(self.results, indent=2, default=str))

    def spawn(self, args: list, log: str, append: bool = False) -> subprocess.Popen:
        """Start args (a list: no shell) with its output into OUT/log, in a process group of its own: torch.compile's
        worker processes die with it when it is killed."""
        with open(self.out / log, "a" if append else "w") as f:
            f.write(f"$ {' '.join(map(str, args))}\n")
            f.flush()
            return subprocess.Popen(list(map(str, args)), cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def run(self, args: list, log: str, until: float | None = None, append: bool = False) -> int:
        """Run args to the end, its whole process group killed at `until` (default: the end of the phase). Raises
        Cut when killed."""
        until = min(until or self.phase_end, self.phase_end)
        proc = self.spawn(args, log, append)
        try:
            return proc.wait(timeout=max(0.0, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill(proc)
            raise Cut from None

    def phase(self, name: str, fn) -> bool:
        """Run fn(check) -> detail dict as phase `name` within its share; record and save. True if it passed."""
        cap = self.caps[name]
        limit = min(cap, self.left() - RESERVE_S)
        row = {"cap_s": cap}
        if limit < self.plan.floors[name]:
            row.update(status="skipped", detail=f"no time left ({max(0, self.left()):.0f} s of the budget)")
            self.results["phases"][name] = row
            self.save()
            self.say(f"{name}: skipped, no time left")
            return False
        self.say(f"{name}: up to {limit:.0f} s")
        self.phase_end = time.monotonic() + limit
        t0 = time.monotonic()
        try:
            row.update(status="ok", **(fn(self) or {}))
        except Cut:
            row.update(status="cut", detail=f"ran past its {limit:.0f} s and was stopped")
        except PhaseFailed as e:
            row.update(status="failed", detail=str(e))
        row["seconds"] = round(time.monotonic() - t0, 1)
        self.phase_end = self.deadline
        self.results["phases"][name] = row
        self.save()
        self.say(f"{name}: {row['status']} in {row['seconds']:.0f} s" + (f" ({row['detail']})" if "detail" in row
                                                                          else ""))
        return row["status"] == "ok"


class PhaseFailed(Exception):
    """A phase's command failed: the message says which and points at its log."""


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def last_line(path: Path) -> str:
    """What a failed command said last: its last error line (the build's `error: ...`, or a traceback's exception),
    not a progress bar drawn after it."""
    lines = [line.split("\r")[-1].strip() for line in path.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if re.match(r"(error: |[\w.]*(Error|Exception|Failed)\b)", line)]
    return (errors or lines or ["(empty log)"])[-1][:300]


# ---------------------------------------------------------------------------------------------------- 1. install
def install(check: Check, wheels: Path) -> dict:
    site = check.work / "site"
    files = sorted(wheels.glob("*.whl"))
    rc = check.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", site, *files], "install.log")
    if rc != 0:
        raise PhaseFailed(f"pip install of {wheels} failed: {last_line(check.out / 'install.log')}")
    # Carried versions first, for this process (the gate reads their metadata) and for every child.
    sys.path.insert(0, str(site))
    check.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), check.env.get("PYTHONPATH")]))
    return {"detail": f"{len(files)} wheels into {site}"}


# ------------------------------------------------------------------------------------------------------- 2. gate
def pins(path: Path) -> dict[str, str]:
    """name -> pinned version of every `name==version` line, following `-r file` includes."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            found.update(pins(path.parent / line[3:].strip()))
        elif m := re.match(r"([A-Za-z0-9._-]+)==([^\s;]+)", line):
            found[normalize(m[1])] = m[2]
    return found


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(name: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def gate(check: Check, requirements: Path) -> dict:
    wrong, own, absent = [], {}, []
    for name, pin in sorted(pins(requirements).items()):
        have = installed(name)
        if name in MACHINE_OWN:
            own[name] = have
        elif name in OPTIONAL:
            if have is None:
                absent.append(name)
        elif have is None or have != pin:
            wrong.append(f"{name} {have or 'missing'} (pinned {pin})")
    if wrong:
        raise GateFailed(f"{', '.join(wrong)}: carry the build's pins (bash tests/gpu/fetch_wheels.sh) or fix "
                         f"{requirements.relative_to(ROOT) if requirements.is_relative_to(ROOT) else requirements}")
    row = {"machine_own": own, "absent": absent, "unmet_dependencies": unmet_dependencies(pins(requirements))}
    try:
        done = subprocess.run([sys.executable, "-c", CUDA_PROBE], env=check.env, capture_output=True, text=True,
                              timeout=max(1, check.phase_end - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise Cut from None
    if done.returncode != 0:
        raise GateFailed(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "torch did not import")
    row["torch"] = json.loads(done.stdout)
    if not check.plan.rehearsal and not row["torch"]["cuda"]:
        raise GateFailed(f"torch {row['torch']['version']} sees no CUDA device")
    row["detail"] = (f"pins match; torch {row['torch']['version']} on {row['torch']['device']}"
                     + (f"; absent: {', '.join(absent)}" if absent else ""))
    return row


# The packages the build calls must import. torch's CUDA and the bitsandbytes library for it: bitsandbytes loads
# libbitsandbytes_cuda<major><minor>.so by torch.version.cuda, and fetch_wheels.sh keeps only the CUDA 13 libraries
# to stay under the carry limit.
CUDA_PROBE = """
import importlib, importlib.util, json, os, torch
for name in ("transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub", "bitsandbytes"):
    try:  # a dependency that the image lacks fails here, in seconds, not after a model has loaded
        importlib.import_module(name)
    except Exception as e:
        raise SystemExit(f"import {name} failed: {type(e).__name__}: {e}")
cuda = torch.cuda.is_available()
row = {"version": torch.__version__, "cuda": torch.version.cuda if cuda else None,
       "device": torch.cuda.get_device_name(0) if cuda else "CPU"}
if cuda:
    spec = importlib.util.find_spec("bitsandbytes")
    lib = "libbitsandbytes_cuda" + torch.version.cuda.replace(".", "") + ".so"
    if spec is None or not os.path.exists(os.path.join(os.path.dirname(spec.origin), lib)):
        raise SystemExit(f"bitsandbytes has no {lib} for torch's CUDA {torch.version.cuda}: fetch its wheel with "
                         "that library kept (tests/gpu/fetch_wheels.sh)")
print(json.dumps(row))
"""


class GateFailed(Exception):
    pass


def unmet_dependencies(pinned: dict[str, str]) -> list[str]:
    """Requirements of the exactly-pinned packages that what is installed does not meet: reported, not fatal (pip's
    bounds are often looser in practice than on paper), so a failure later can be read against them."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return ["(packaging not installed: dependencies not checked)"]
    import importlib.metadata as md

    unmet = []
    for name in sorted(set(pinned) - MACHINE_OWN - OPTIONAL):
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = installed(req.name)
            if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
                unmet.append(f"{name} needs {req.name}{req.specifier or ''}, found {have or 'none'}")
    return unmet


# ------------------------------------------------------------------------------------------------------- 3. base
def e2e_args(check: Check, config_dir: Path) -> list:
    plan = check.plan
    args = [sys.executable, ROOT / "build" / "run.py", "--recipe", plan.recipe, "--random_init", "true",
            "--config_name_or_path", config_dir, "--dataset", SAMPLE, "--eval_fraction", "0.1",
            "--output-dir", check.work / "e2e"]
    if plan.rehearsal:  # the tiny recipe names no Hub model: the config folder stands for it
        args += ["--model_name_or_path", config_dir]
    return args


def base(check: Check) -> dict:
    config_dir = check.work / "config"
    maker = "build_tiny_phi3" if check.plan.rehearsal else "phi35_config_dir"
    code = ("import sys; sys.path[:0] = ['tests/benchmarks', 'tests']; from pathlib import Path; "
            f"import bench_training, tiny_models; f = {{'phi35_config_dir': bench_training.phi35_config_dir, "
            f"'build_tiny_phi3': tiny_models.build_tiny_phi3}}['{maker}']; f(Path({str(config_dir)!r}))")
    if check.run([sys.executable, "-c", code], "base.log") != 0:
        raise PhaseFailed(f"config: {last_line(check.out / 'base.log')}")
    if check.run([*e2e_args(check, config_dir), "--stages", "data"], "base.log", append=True) != 0:
        raise PhaseFailed(f"data stage: {last_line(check.out / 'base.log')}")
    check.results["config_dir"] = str(config_dir)
    return {"detail": f"{sum(f.stat().st_size for f in check.base.glob('*.safetensors')) / 1e6:,.0f} MB of weights"}


# ------------------------------------------------------------------------------------------------------ 4. bench
def bench(check: Check) -> dict:
    plan, runs = check.plan, {}
    check.results["bench"] = runs
    variants = ["plain", "recipe"]
    for i, variant in enumerate(variants):
        # The plain run may take half of what is left, so that the recipe always gets its turn.
        share = (check.phase_end - time.monotonic()) / (len(variants) - i)
        results = check.work / f"bench-{variant}.json"
        args = [sys.executable, ROOT / "tests" / "benchmarks" / "bench_training.py", "--variants", variant,
                "--datasets", "oasst", "--base", check.base, "--recipe", plan.recipe, "--max_length",
                plan.max_length, "--steps", plan.bench_steps, "--log_every", plan.log_every, "--results", results,
                "--logs", check.out]
        if plan.rehearsal:
            args.append("--cpu")
        if variant == "recipe":
            args += [f"--set={s}" for s in plan.recipe_sets]
        try:
            check.run(args, "bench.log", until=time.monotonic() + share, append=i > 0)
        except Cut:
            if check.phase_end - time.monotonic() > 1:  # its own share ran out, not the phase: the next one runs
                runs[f"{variant}-oasst"] = {"error": f"cut after its {share:.0f} s"}
                check.save()
                continue
            runs[f"{variant}-oasst"] = {"error": "cut at the phase's end"}
            raise
        if results.is_file():
            runs.update(json.loads(results.read_text())["runs"])
        else:
            runs[f"{variant}-oasst"] = {"error": f"no result: {last_line(check.out / 'bench.log')}"}
        check.save()
    failed = [k for k, r in runs.items() if "error" in r]
    if failed:
        raise PhaseFailed(f"{', '.join(failed)} failed (see the bench table)")
    return {"detail": verdict(runs)}


def verdict(runs: dict) -> str:
    """The issue's goal in one line: the recipe at >= 2x the plain shape's tokens/s, at <= its memory."""
    plain, recipe = runs.get("plain-oasst", {}), runs.get("recipe-oasst", {})
    if not plain.get("tokens_per_s") or not recipe.get("tokens_per_s"):
        return "goal not measured (a run has no rate)"
    ratio = recipe["tokens_per_s"] / plain["tokens_per_s"]
    mem = [(r.get("peak_device_used_bytes") or r.get("peak_gpu_reserved_bytes") or r.get("peak_gpu_bytes"))
           for r in (plain, recipe)]
    memory = "memory unmeasured" if None in mem else f"memory {mem[1] / mem[0]:.2f}x"
    met = ratio >= 2 and None not in mem and mem[1] <= mem[0]
    return f"recipe {ratio:.2f}x plain tokens/s, {memory}: goal {'met' if met else 'not met'}"


# ------------------------------------------------------------------------------------------------------ 5. train
def train(check: Check) -> dict:
    """data,train for two checkpoints' worth of steps, killed (SIGKILL: a lost machine) once the first checkpoint is
    complete, then the same command again, which must resume from it."""
    save = check.plan.save_steps
    config_dir = Path(check.results["config_dir"])
    args = [*e2e_args(check, config_dir), "--stages", "data,train", "--max_steps", 2 * save, "--save_steps", save,
            "--eval_steps", save, "--logging_steps", max(1, save // 5), "--eval_conversations", 4]
    report = check.work / "e2e" / "report.json"
    report.unlink(missing_ok=True)
    first = check.work / "e2e" / "adapter" / "checkpoints" / f"checkpoint-{save}" / "trainer_state.json"
    proc = check.spawn(args, "train.log")
    while not first.is_file() and proc.poll() is None and time.monotonic() < check.phase_end:
        time.sleep(0.05)
    killed = proc.poll() is None
    kill(proc)
    if not first.is_file():
        if time.monotonic() >= check.phase_end:
            raise Cut
        raise PhaseFailed(f"no checkpoint-{save} (exit {proc.returncode}): {last_line(check.out / 'train.log')}")
    if not killed:
        raise PhaseFailed(f"training ended before it could be killed after checkpoint-{save}: nothing to resume")
    with open(check.out / "train.log", "a") as f:
        f.write(f"\n[check] killed after checkpoint-{save}; the same command again:\n")
    if check.run(args, "train.log", append=True) != 0:
        raise PhaseFailed(f"the run after the kill failed: {last_line(check.out / 'train.log')}")
    t = json.loads(report.read_text())["train"]
    check.results["train"] = t
    if t.get("resumed_from") != f"checkpoint-{save}":
        raise PhaseFailed(f"did not resume from checkpoint-{save} (resumed_from: {t.get('resumed_from')})")
    rate = f", {t['tokens_per_s']:,.0f} tokens/s" if t.get("tokens_per_s") else ""
    return {"detail": f"{t['steps']} steps, resumed from checkpoint-{save} after a kill, loss {t['first_loss']:.3f} "
                      f"-> {t['last_loss']:.3f}{rate}" + (f", compile fell back: {t['compile_error']}"
                                                          if t.get("compile_error") else "")}


# -------------------------------------------------------------------------------------------------------- 6. cpu
def cpu_stages(check: Check, llama_cpp_dir: Path | None) -> dict:
    stages = "merge,export" + (",quantize,evaluate" if installed("llama-cpp-python") else "")
    config_dir = Path(check.results["config_dir"])
    args = [*e2e_args(check, config_dir), "--stages", stages, "--max_steps", 2 * check.plan.save_steps,
            "--save_steps", check.plan.save_steps, "--eval_steps", check.plan.save_steps, "--logging_steps",
            max(1, check.plan.save_steps // 5), "--eval_conversations", 4, "--quant_types", "Q4_K_M"]
    if llama_cpp_dir:
        args += ["--llama_cpp_dir", llama_cpp_dir]
    if check.run(args, "cpu.log") != 0:
        raise PhaseFailed(f"{stages}: {last_line(check.out / 'cpu.log')}")
    report = json.loads((check.work / "e2e" / "report.json").read_text())
    check.results["cpu"] = {k: report.get(k) for k in ("merge", "export", "quants", "stage_seconds")}
    seconds = report.get("stage_seconds", {})
    return {"detail": ", ".join(f"{s} {seconds[s]:.0f} s" for s in stages.split(",") if s in seconds)}


# ------------------------------------------------------------------------------------------------------- table
def table(check: Check) -> str:
    rows = [[name, r["status"], f"{r.get('seconds', 0):.0f}", r.get("detail", "")]
            for name, r in check.results["phases"].items()]
    text = markdown(["phase", "status", "s", "result"], rows)
    if check.results.get("bench"):
        sys.path[:0] = [str(ROOT / "tests" / "benchmarks")]
        import bench_training

        text += "\n\n" + markdown(bench_training.HEADER, bench_training.rows(check.results["bench"]))
    mode = "CPU rehearsal (tiny Phi-3: plumbing only, the numbers mean nothing)" if check.plan.rehearsal else "GPU"
    return f"check {check.results['started']}, {mode}, {check.elapsed():.0f} s of {check.results['budget_s']:.0f}\n\n" \
           + text


def markdown(header: list, rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--rehearsal", action="store_true", help="on the CPU: tiny Phi-3, no install, seconds-sized")
    parser.add_argument("--budget", type=float, help="seconds for everything (GPU 480, rehearsal 420)")
    parser.add_argument("--cap", action="append", default=[], metavar="PHASE=SECONDS",
                        help="at most this long for one phase (e.g. bench=5 to see a phase cut)")
    parser.add_argument("--phases", default="install,gate,base,bench,train,cpu", help="comma-separated subset")
    parser.add_argument("--requirements", type=Path, default=REQUIREMENTS, help="the pins the gate checks")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels", help="wheels to install first")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/gpu-check"))
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("WORK") or "/tmp/gpu-work"))
    args = parser.parse_args(argv)
    plan = Plan(args.rehearsal)
    caps = {k: float(v) for k, v in (c.split("=", 1) for c in args.cap)}
    if unknown := (set(caps) | set(args.phases.split(","))) - set(plan.caps):
        parser.error(f"unknown phase {sorted(unknown)}; phases: {', '.join(plan.caps)}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    check = Check(plan, args.out, args.work, args.budget or plan.budget, caps)
    phases = args.phases.split(",")
    wheels = None if plan.rehearsal or not args.wheels.is_dir() else args.wheels
    llama_cpp_dir = args.wheels / "llama.cpp" if wheels and (args.wheels / "llama.cpp").is_dir() else None

    if "install" in phases and wheels:
        if not check.phase("install", lambda c: install(c, wheels)):
            print(table(check))
            return 1
    if "gate" in phases:
        try:
            passed = check.phase("gate", lambda c: gate(c, args.requirements))
        except GateFailed as e:
            check.results["phases"]["gate"] = {"status": "failed", "detail": str(e)}
            check.save()
            print(f"check: version gate: {e}", flush=True)
            return 3
        if not passed:  # cut: nothing is known of the packages, so nothing after it can be trusted
            print("\n" + table(check), flush=True)
            return 1
    steps = [("base", base), ("bench", bench), ("train", train), ("cpu", lambda c: cpu_stages(c, llama_cpp_dir))]
    for name, fn in steps:
        if name not in phases:
            continue
        if "base" not in phases and check.base.is_dir():  # --phases without base: the base an earlier call built
            check.results["config_dir"] = str(check.work / "config")
        if name != "base" and "config_dir" not in check.results:
            check.results["phases"][name] = {"status": "skipped", "detail": "no base (phase base did not pass)"}
            continue
        check.phase(name, fn)
    check.save()
    text = table(check)
    print("\n" + text, flush=True)
    return 0 if all(r["status"] == "ok" for r in check.results["phases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
