"""Stage 7, publish: assemble hub/ (GGUF files + README.md card + images) and, when `hub_repo` is set, push it.

hub/ is exactly what is uploaded, always built so it can be inspected. The token comes from HF_TOKEN or
`hf auth login` (huggingface_hub finds it); it is handed to HfApi and never printed, logged or written. With
publishing on, `preflight` runs before any training: a missing token or a repo we cannot write to fails in seconds.
"""

from __future__ import annotations

from pathlib import Path

from .card import render
from .common import BuildError, fresh_dir, link_or_copy, log
from .recipe import Recipe


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def preflight(recipe: Recipe) -> dict:
    """Token present and able to write `hub_repo` (or create it in its namespace). Raises BuildError otherwise."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    token = _token()
    if not token:
        raise BuildError(
            f"hub_repo is {recipe.hub_repo} but no Hugging Face token: set HF_TOKEN or run `hf auth login`"
        )
    api = HfApi(token=token)
    try:
        me = api.whoami()
    except HfHubHTTPError as e:
        raise BuildError(f"the Hugging Face token was rejected: {_scrub(str(e).splitlines()[0], token)}") from None
    namespace = recipe.hub_repo.split("/")[0]
    try:
        api.auth_check(recipe.hub_repo, write=True)
    except RepositoryNotFoundError:
        # A new repo: we may create it if the namespace is ours or one of our orgs and the token can write.
        ours = {me.get("name")} | {o.get("name") for o in me.get("orgs", [])}
        role = me.get("auth", {}).get("accessToken", {}).get("role")
        if namespace not in ours or role == "read":
            raise BuildError(
                f"cannot create {recipe.hub_repo}: the token ({role or 'unknown'} access, user "
                f"{me.get('name')}) cannot write to namespace '{namespace}'"
            ) from None
    except HfHubHTTPError as e:
        raise BuildError(f"no write access to {recipe.hub_repo}: {_scrub(str(e).splitlines()[0], token)}") from None
    log(f"[publish] preflight ok: {me.get('name')} can write {recipe.hub_repo}")
    return {"user": me.get("name")}


def assemble(
    recipe: Recipe, report: dict, gguf_files: list[Path], images: list[Path], hub_dir: Path, model_type: str,
    base_files: list[Path] = (),
) -> list[Path]:
    """hub/ from scratch: hard links to the GGUF files, the images, the base's GGUFs under base/, the card."""
    fresh_dir(hub_dir)
    files = []
    for src, dest in [*((f, hub_dir / f.name) for f in [*gguf_files, *images]),
                      *((f, hub_dir / "base" / f.name) for f in base_files)]:
        dest.parent.mkdir(exist_ok=True)
        link_or_copy(src, dest)
        files.append(dest)
    card = render(recipe, report, [f.name for f in gguf_files], [i.name for i in images], model_type,
                  [f"base/{f.name}" for f in base_files])
    (hub_dir / "README.md").write_text(card, encoding="utf-8")
    return [hub_dir / "README.md", *files]


def upload(recipe: Recipe, hub_dir: Path) -> dict:
    from huggingface_hub import HfApi

    token = _token()
    api = HfApi(token=token)
    api.create_repo(recipe.hub_repo, repo_type="model", private=recipe.hub_private, exist_ok=True)
    log(f"[publish] uploading {hub_dir} to {recipe.hub_repo}")
    commit = api.upload_folder(
        repo_id=recipe.hub_repo,
        repo_type="model",
        folder_path=str(hub_dir),
        commit_message=f"Build with recipe {recipe.name}",
        # Files gone from hub/ (a quant type dropped from the recipe) are deleted: the repo mirrors hub/.
        delete_patterns=["*.gguf", "*.png", "*.md", "base/*.gguf"],
    )
    url = getattr(commit, "commit_url", None) or f"https://huggingface.co/{recipe.hub_repo}"
    return {"repo": recipe.hub_repo, "url": _scrub(str(url), token), "uploaded": True}


def visitor_tally(recipe: Recipe) -> dict:
    """The side-by-side votes of the Space (ggufchat/votes.py's tally, the one the page shows): of the rows whose
    fine-tune is this build's GGUF if there are any, else of every row."""
    from ggufchat.votes import read_votes, tally

    source = Path(recipe.visitor_votes).expanduser()
    if not source.is_file():
        from huggingface_hub import hf_hub_download

        try:
            source = Path(hf_hub_download(recipe.visitor_votes, "votes.csv", repo_type="dataset"))
        except Exception as e:  # noqa: BLE001 - not found, no network, no access: huggingface_hub's many errors
            raise BuildError(f"visitor_votes {recipe.visitor_votes}: neither a votes.csv file nor a Hub dataset "
                             f"holding one ({type(e).__name__})") from None
    rows = read_votes(source)
    ours = [r for r in rows if recipe.gguf_name in r.get("finetune", "")]
    rows = ours or rows
    pairs = sorted({(r.get("finetune", ""), r.get("base", "")) for r in rows})
    log(f"[publish] {len(rows)} visitor votes from {source}")
    return {**tally(rows), "pairs": [list(p) for p in pairs], "source": recipe.visitor_votes}


def run(
    recipe: Recipe, report: dict, gguf_dir: Path, adapter_dir: Path, hub_dir: Path, model_type: str,
    base_gguf_dir: Path | None = None,
) -> tuple[dict, list[Path]]:
    names = [f"{recipe.gguf_name}-{q}.gguf" for q in recipe.quant_types]
    if recipe.hub_include_f16:
        names.append(f"{recipe.gguf_name}-f16.gguf")
    missing = [n for n in names if not (gguf_dir / n).is_file()]
    if missing:
        raise BuildError(f"{missing[0]} is missing from {gguf_dir}: run the export/quantize stages first")
    base_files = []
    if recipe.hub_include_base:
        base = (base_gguf_dir or gguf_dir) / f"{recipe.gguf_name}-base-{recipe.quant_types[0]}.gguf"
        if not base.is_file():
            raise BuildError(f"hub_include_base: {base.name} is missing from {base.parent}: the evaluate stage makes "
                             "it (with eval_base true)")
        base_files.append(base)
    images = [p for p in [adapter_dir / "loss_curve.png"] if p.is_file()]
    if recipe.visitor_votes:
        report = {**report, "visitors": visitor_tally(recipe)}
    files = assemble(recipe, report, [gguf_dir / n for n in names], images, hub_dir, model_type, base_files)
    result = {
        "hub_dir": str(hub_dir),
        "files": sorted(str(f.relative_to(hub_dir)) for f in files),
        "repo": recipe.hub_repo or None,
        "uploaded": False,
    }
    if recipe.hub_repo:
        result.update(upload(recipe, hub_dir))
    else:
        log("[publish] hub/ assembled; no hub_repo in the recipe, nothing uploaded")
    return result, files
