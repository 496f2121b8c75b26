"""Stage 1, data: oasst1 message trees -> multi-turn conversations `{"messages": [...]}`.

From each root, follow the best-ranked reply at every step (rank 0 = best, as openassistant-guanaco did; among
follow-up prompts, only those that got an answer), so each tree gives one conversation ending on an assistant turn.
Rows that cannot be used are counted by reason, never silently lost. Conversations are stored as role/content
messages and rendered later by the base model's own chat template: the format the model is trained on is the one
the Space sends.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from .common import BuildError, fresh_dir, log
from .recipe import Recipe, dataset_path

ROLES = {"prompter": "user", "assistant": "assistant"}
# Why a message is not used; every message dropped is counted under exactly one of these.
REASONS = {
    "malformed": "not a JSON object, or no message_id",
    "duplicate_id": "a message_id seen before",
    "deleted": "deleted by moderators",
    "review_failed": "failed review (review_result false)",
    "empty_text": "empty or non-string text",
    "unknown_role": "role neither prompter nor assistant",
    "role_order": "same role as its parent, or a root that is not a prompt",
    "missing_parent": "parent_id not in the data",
    "cycle": "its parent chain loops",
    "parent_dropped": "an ancestor was dropped",
    "language": "tree not in `languages`",
}


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict | None]:
    """One entry per line; unparsable lines become None so they are counted as malformed, not fatal."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append(None)
    return rows


def read_local(path: Path) -> list[dict | None]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return read_jsonl(path)


def read_hub(name: str) -> tuple[list[dict], list[dict]]:
    """A Hub dataset id, or a local folder `datasets` can load (e.g. train/validation parquet files)."""
    from datasets import load_dataset

    ds = load_dataset(name)
    missing = {"train", "validation"} - set(ds)
    if missing:
        raise BuildError(f"dataset {name} has no {'/'.join(sorted(missing))} split (splits: {', '.join(ds)})")
    return ds["train"].to_list(), ds["validation"].to_list()


# ---------------------------------------------------------------------------------------------------------------------
# Trees -> threads
# ---------------------------------------------------------------------------------------------------------------------


def _row_problem(row: dict) -> str | None:
    if row.get("deleted") is True:
        return "deleted"
    if row.get("review_result") is False:  # None = not reviewed yet: kept, as in the oasst1 export itself
        return "review_failed"
    if not isinstance(row.get("text"), str) or not row["text"].strip():
        return "empty_text"
    if row.get("role") not in ROLES:
        return "unknown_role"
    return None


def extract_threads(rows: Iterable[dict | None], languages: list[str] | None = None) -> tuple[list[dict], dict]:
    """Rows in the oasst1 schema -> (threads, stats). Each thread: {"messages", "tree_id", "lang"}.

    stats: trees (roots seen), threads, turns, dropped {reason: messages}, trees_without_reply, unused_branches.
    """
    dropped: Counter = Counter()
    parent_of: dict[str, str | None] = {}  # every identified row, dropped or not: tells "missing" from "dropped"
    valid: dict[str, dict] = {}
    order: dict[str, int] = {}
    for i, row in enumerate(rows):
        mid = row.get("message_id") if isinstance(row, dict) else None
        if not isinstance(mid, str) or not mid:
            dropped["malformed"] += 1
            continue
        if mid in parent_of:
            dropped["duplicate_id"] += 1
            continue
        parent_of[mid] = row.get("parent_id")
        problem = _row_problem(row)
        if problem:
            dropped[problem] += 1
            continue
        valid[mid], order[mid] = row, i

    children: dict[str, list[str]] = defaultdict(list)
    for mid, row in valid.items():
        if row.get("parent_id") is not None:
            children[row["parent_id"]].append(mid)

    def rank_key(mid: str):  # best rank first; unranked replies after ranked ones, then file order
        rank = valid[mid].get("rank")
        return (rank is None, rank if rank is not None else 0, order[mid])

    # Walk every tree from its root; only replies that alternate roles are usable.
    usable: set[str] = set()
    role_order: set[str] = set()
    kept_roots: list[str] = []
    language_ok = lambda r: not languages or r.get("lang") in languages  # noqa: E731
    roots = sorted((m for m, r in valid.items() if r.get("parent_id") is None), key=order.get)
    for root in roots:
        if valid[root]["role"] != "prompter":
            role_order.add(root)
            continue
        tree, stack = [], [root]
        while stack:
            mid = stack.pop()
            tree.append(mid)
            for child in children.get(mid, ()):
                if valid[child]["role"] == valid[mid]["role"]:
                    role_order.add(child)
                else:
                    stack.append(child)
        if language_ok(valid[root]):
            usable.update(tree)
            kept_roots.append(root)
        else:
            dropped["language"] += len(tree)
            usable.update(tree)  # reached, so not counted again below; excluded through kept_roots
    dropped["role_order"] += len(role_order)

    # Valid messages never reached from a root: say why, from the first break in their parent chain.
    for mid in valid:
        if mid in usable or mid in role_order:
            continue
        seen, cur = {mid}, valid[mid].get("parent_id")
        while True:
            if cur not in parent_of:
                dropped["missing_parent"] += 1
                break
            if cur in seen:
                dropped["cycle"] += 1
                break
            if cur not in valid or cur in role_order:
                dropped["parent_dropped"] += 1
                break
            seen.add(cur)
            cur = valid[cur].get("parent_id")

    def replies(mid: str) -> list[str]:
        return [c for c in children.get(mid, ()) if c in usable and c not in role_order]

    threads, without_reply, on_path = [], 0, 0
    for root in kept_roots:
        path, cur = [root], root
        while True:
            options = replies(cur)
            if valid[cur]["role"] == "assistant":
                # A follow-up prompt is only worth taking if someone answered it.
                options = [c for c in options if replies(c)]
            if not options:
                break
            cur = min(options, key=rank_key)
            path.append(cur)
        if valid[path[-1]]["role"] != "assistant":
            path.pop()  # only a root can be left unanswered: there is no assistant turn to learn from
        if len(path) < 2:
            without_reply += 1
            continue
        on_path += len(path)
        messages = [{"role": ROLES[valid[m]["role"]], "content": valid[m]["text"].strip()} for m in path]
        threads.append({"messages": messages, "tree_id": root, "lang": valid[root].get("lang")})

    stats = {
        "messages": len(parent_of) + dropped["malformed"] + dropped["duplicate_id"],
        "trees": len(kept_roots),
        "threads": len(threads),
        "turns": sum(len(t["messages"]) for t in threads),
        "trees_without_reply": without_reply,
        "unused_branches": len(usable) - dropped["language"] - on_path,
        "dropped": {k: dropped[k] for k in REASONS if dropped[k]},
    }
    return threads, stats


def split_by_tree(threads: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out whole trees (a stable hash of the tree id), so no conversation prefix is in both splits."""

    def u(tree_id: str) -> float:
        return int(hashlib.sha256(f"{seed}:{tree_id}".encode()).hexdigest()[:12], 16) / 16**12

    train = [t for t in threads if u(t["tree_id"]) >= fraction]
    evals = [t for t in threads if u(t["tree_id"]) < fraction]
    if not evals and len(threads) > 1:  # tiny files: still hold out one tree rather than evaluate on nothing
        pick = min(threads, key=lambda t: u(t["tree_id"]))
        train, evals = [t for t in threads if t is not pick], [pick]
    return train, evals


def _merge_stats(a: dict, b: dict) -> dict:
    out = {k: a[k] + b[k] for k in a if k != "dropped"}
    out["dropped"] = dict(Counter(a["dropped"]) + Counter(b["dropped"]))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, threads: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for t in threads:
            f.write(json.dumps(t, ensure_ascii=False) + "\n")


def count_tokens(threads: list[dict], tokenizer, desc: str) -> int:
    from tqdm.auto import tqdm

    return sum(
        len(tokenizer.apply_chat_template(t["messages"], tokenize=True, return_dict=True)["input_ids"])
        for t in tqdm(threads, desc=desc, unit="thread", leave=False)
    )


def run(recipe: Recipe, base: str, data_dir: Path) -> tuple[dict, list[Path]]:
    """Writes data_dir/{train,eval}.jsonl; returns (report section, files written)."""
    from transformers import AutoTokenizer

    if recipe.is_local_dataset:
        path = dataset_path(recipe)
        log(f"[data] reading {path}")
        threads, stats = extract_threads(read_local(path), recipe.languages)
        train, evals = split_by_tree(threads, recipe.eval_fraction, recipe.seed)
    else:
        local = dataset_path(recipe)
        source = str(local) if local.is_dir() else recipe.dataset
        log(f"[data] loading {source} with datasets")
        train_rows, eval_rows = read_hub(source)
        train, s1 = extract_threads(train_rows, recipe.languages)
        evals, s2 = extract_threads(eval_rows, recipe.languages)
        stats = _merge_stats(s1, s2)
    shared = {t["tree_id"] for t in train} & {t["tree_id"] for t in evals}
    if shared:
        raise BuildError(f"{len(shared)} trees are in both train and eval (e.g. {next(iter(shared))})")
    if recipe.max_train_threads > 0:
        train = train[: recipe.max_train_threads]
    if recipe.max_eval_threads > 0:
        evals = evals[: recipe.max_eval_threads]
    if not train or not evals:
        raise BuildError(f"no {'training' if not train else 'eval'} conversations left in {recipe.dataset}")

    tokenizer = AutoTokenizer.from_pretrained(base)
    fresh_dir(data_dir)
    files = []
    for name, split in (("train", train), ("eval", evals)):
        write_jsonl(data_dir / f"{name}.jsonl", split)
        files.append(data_dir / f"{name}.jsonl")
        stats[name] = {
            "threads": len(split),
            "turns": sum(len(t["messages"]) for t in split),
            "tokens": count_tokens(split, tokenizer, f"tokens ({name})"),
        }
    stats["tokens"] = stats["train"]["tokens"] + stats["eval"]["tokens"]
    dropped = ", ".join(f"{k} {v}" for k, v in stats["dropped"].items()) or "none"
    log(
        f"[data] {stats['trees']} trees -> {stats['threads']} threads ({len(train)} train / {len(evals)} eval used), "
        f"{stats['tokens']} tokens; dropped messages: {dropped}"
    )
    return stats, files
