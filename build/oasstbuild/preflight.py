"""Checks run before any stage: what can fail in seconds must not fail after a download or hours of training.

Each raises BuildError with one sentence saying what is missing and what to set. (The Hub write check for publishing
is publish.preflight.)
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path

from .common import BuildError, human_bytes
from .recipe import Recipe, dataset_path

HUB_TIMEOUT_S = 10  # a reachability check, not a download: fail fast on a machine without network
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu126"  # CUDA 12.6 wheels: drivers from 560 on
# Host RAM the merge needs per parameter of the base: the float32 weights (4 bytes) plus its working set (the LoRA
# weights, the check's logits, the copy in merge_dtype being saved). Phi-3.5-mini's 3.8B parameters: ~16.4 GB.
MERGE_BYTES_PER_PARAM = 4.3


def check_cuda(recipe: Recipe) -> None:
    """require_cuda: torch must see a CUDA device. A wheel built for a newer CUDA than the driver supports, or a
    CPU-only wheel, would otherwise train a GPU-sized recipe on the CPU (bitsandbytes' paged optimizer only warns)."""
    if not recipe.require_cuda:
        return
    import torch

    if torch.cuda.is_available():
        return
    version = torch.__version__.split("+")[0]
    if torch.version.cuda:
        found = f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, finds no usable GPU (none, or a "
        found += f"driver older than CUDA {torch.version.cuda} needs)"
    else:
        found = f"torch {torch.__version__} is a CPU-only build"
    raise BuildError(
        f"recipe {recipe.name} trains on a CUDA GPU (require_cuda: true) but {found}: install a torch build your "
        f"driver supports, e.g. `pip install torch=={version} --index-url {TORCH_CUDA_INDEX}`, or pass "
        "--require_cuda false to train on the CPU"
    )


def _looks_local(spec: str) -> bool:
    """A path rather than a Hub id (`name` or `namespace/name`)."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec


def _in_hub_cache(repo_id: str, repo_type: str) -> bool:
    """Whether a `from_pretrained` / `load_dataset` of repo_id can be served from the local caches alone."""
    from huggingface_hub import constants, try_to_load_from_cache

    if repo_type == "model":
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}" / "snapshots"
    prepared = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    return any(hub.glob("*/*")) or (prepared / repo_id.replace("/", "___")).is_dir()


def _check_hub_source(repo_id: str, repo_type: str, what: str, flag: str) -> None:
    """repo_id must be cached, or reachable on the Hub with the token we have."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if _in_hub_cache(repo_id, repo_type):
        return
    local = f"give a local copy with {flag} PATH"
    if constants.is_offline_mode():
        raise BuildError(
            f"{what} {repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is "
            f"set: {local}, or unset HF_HUB_OFFLINE on a machine with network access"
        )
    api = HfApi()
    info = api.model_info if repo_type == "model" else api.dataset_info
    try:
        info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise BuildError(
            f"{what} {repo_id} is gated and no token with access was found: accept its terms on "
            f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id} and set HF_TOKEN (or "
            f"run `hf auth login`), or {local}"
        ) from None
    except RepositoryNotFoundError:
        raise BuildError(
            f"{what} {repo_id} is not on the Hugging Face Hub, or is private and no token with access was found: "
            f"check the name, set HF_TOKEN (or run `hf auth login`), or {local}"
        ) from None
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", "an error")
        raise BuildError(
            f"the Hugging Face Hub answered {status} when asked for {what} {repo_id}: try again later, or {local}"
        ) from None
    except Exception as e:  # noqa: BLE001 - no network, DNS, proxy, timeout: the HTTP client's own error types
        raise BuildError(
            f"cannot reach the Hugging Face Hub for {what} {repo_id} ({type(e).__name__}): connect to the network "
            f"(HF_TOKEN for gated or private repos), or {local}"
        ) from None


def check_sources(recipe: Recipe, stages: list[str], needs_base: set[str]) -> None:
    """The base model (for the stages that load it) and the dataset (for the data stage) can be had: a local path, a
    cached Hub repo, or a Hub repo we can reach and read. py:PACKAGE/FILE bases are checked when resolved."""
    if needs_base & set(stages):
        spec = (recipe.config_name_or_path or recipe.model_name_or_path) if recipe.random_init else None
        spec = spec or recipe.model_name_or_path
        flag = "--config_name_or_path" if recipe.random_init and recipe.config_name_or_path else "--model_name_or_path"
        what = "config of the base model" if recipe.random_init else "base model"
        if not spec.startswith("py:") and not Path(spec).expanduser().exists():
            if _looks_local(spec):
                raise BuildError(f"{what} folder not found: {spec}")
            _check_hub_source(spec, "model", what, flag)
    if "data" in stages and not recipe.is_local_dataset and not dataset_path(recipe).exists():
        if _looks_local(recipe.dataset):
            raise BuildError(f"dataset folder not found: {recipe.dataset}")
        _check_hub_source(recipe.dataset, "dataset", "dataset", "--dataset")


def config_source(recipe: Recipe) -> str:
    """Where the base's config comes from: a Hub id, a folder, a py:PACKAGE/FILE GGUF, or random_init's config."""
    return (recipe.config_name_or_path or recipe.model_name_or_path) if recipe.random_init else recipe.model_name_or_path


def base_parameters(recipe: Recipe) -> int | None:
    """The base's parameter count, from its config alone (a model built on the meta device: nothing allocated, no
    weights read). None when the config cannot be had here: a py:PACKAGE/FILE GGUF base (known once dequantized), or
    a Hub base whose config cannot be fetched (check_sources reports why)."""
    spec = config_source(recipe)
    if spec.startswith("py:"):
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    local = Path(spec).expanduser()
    try:
        config = AutoConfig.from_pretrained(str(local) if local.exists() else spec)
    except Exception:  # noqa: BLE001 - offline, unreachable, gated: check_sources has said which
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied weights counted once, as they are stored


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), in bytes; None off Linux."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_merge_memory(recipe: Recipe, stages: list[str], available_bytes: int | None = None) -> None:
    """The merge runs on the CPU in float32: the base must fit in host RAM, or the merge would be killed (or swap for
    hours) after all of training. available_bytes: None = this machine's MemAvailable."""
    if "merge" not in stages:
        return
    available = mem_available() if available_bytes is None else available_bytes
    params = base_parameters(recipe) if available is not None else None
    if params is None:
        return
    needed = int(params * MERGE_BYTES_PER_PARAM)
    if needed <= available:
        return
    count = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    raise BuildError(
        f"the merge stage needs about {human_bytes(needed)} of host RAM for the {count} parameters of the base "
        f"{config_source(recipe)} in float32, but only {human_bytes(available)} is available: run it on a machine with "
        "more RAM, or leave merge out of --stages here (e.g. --stages data,train) and run --stages merge,export,"
        "quantize,evaluate,publish later on one that has it"
    )


def triton_compiler() -> str | None:
    """The C compiler Triton would use, found as it looks (triton/runtime/build.py): $CC, else gcc, else clang."""
    if os.environ.get("CC"):
        words = shlex.split(os.environ["CC"])  # CC may carry flags ("gcc -m64"), as make allows
        return shutil.which(words[0]) if words else None
    return shutil.which("gcc") or shutil.which("clang")


def python_headers() -> Path:
    """Where Triton looks for Python.h: the default install scheme's include dir (posix_local read as posix_prefix,
    as Triton does for Debian's Python)."""
    scheme = sysconfig.get_default_scheme()
    return Path(sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"])


def check_build_tools(stages: list[str], cuda: bool | None = None) -> None:
    """Training on CUDA runs Triton kernels even with compile_decoder off (TRL's fused loss head), and Triton builds
    a small C launcher at first use: without a C compiler and Python's headers training dies at its first step.
    cuda: None = whether torch sees a CUDA device."""
    if "train" not in stages:
        return
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        return
    missing = []
    if triton_compiler() is None:
        cc = os.environ.get("CC")
        missing.append(f"a C compiler ($CC={cc} is not found)" if cc else "a C compiler (no gcc or clang on PATH)")
    headers = python_headers()
    if not (headers / "Python.h").is_file():
        missing.append(f"Python's C headers ({headers}/Python.h)")
    if missing:
        raise BuildError(
            f"training on CUDA compiles Triton kernels at the first step, which needs {' and '.join(missing)}: "
            f"install them, e.g. `apt-get install build-essential python{sys.version_info[0]}.{sys.version_info[1]}-dev`"
            ", or set CC to a compiler"
        )
