"""The data stage: oasst1 trees -> best-ranked multi-turn conversations, broken rows counted and skipped."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from conftest import TINY_RECIPE
from oasstbuild.data import REASONS, extract_threads, read_jsonl, split_by_tree


def data_stage(base, dataset, out, *extra) -> int:
    """`build/run.py --stages data` with the tiny Phi-3 recipe, in process."""
    import run

    return run.main(["--recipe", str(TINY_RECIPE), "--model_name_or_path", str(base), "--dataset", str(dataset),
                     "--stages", "data", "--output-dir", str(out), *extra])


@pytest.fixture(scope="module")
def sample_rows(oasst_sample):
    return read_jsonl(oasst_sample)


def test_sample_gives_one_conversation_per_tree(sample_rows):
    threads, stats = extract_threads(sample_rows)
    assert stats["trees"] == 80 and stats["threads"] == len(threads) == 80
    assert stats["dropped"] == {} and stats["messages"] == 952
    for t in threads:
        roles = [m["role"] for m in t["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles, roles[1:])), "roles alternate"
        assert all(m["content"] == m["content"].strip() and m["content"] for m in t["messages"])
    assert stats["turns"] == sum(len(t["messages"]) for t in threads)
    assert max(len(t["messages"]) for t in threads) > 2, "multi-turn conversations, not single pairs"


def test_each_step_follows_the_best_ranked_reply(sample_rows):
    threads, _ = extract_threads(sample_rows)
    by_id = {r["message_id"]: r for r in sample_rows}
    children = defaultdict(list)
    for r in sample_rows:
        children[r["parent_id"]].append(r)
    by_text = {(r["parent_id"], r["text"].strip()): r for r in sample_rows}
    checked = 0
    for t in threads:
        parent = by_id[t["tree_id"]]
        assert parent["text"].strip() == t["messages"][0]["content"]
        for message in t["messages"][1:]:
            chosen = by_text[(parent["message_id"], message["content"])]
            options = children[parent["message_id"]]
            if message["role"] == "user":  # follow-up prompts: only those that were answered
                options = [c for c in options if children[c["message_id"]]]
            ranked = [c["rank"] for c in options if c["rank"] is not None]
            if ranked:
                assert chosen["rank"] == min(ranked)
                checked += len(ranked) > 1
            parent = chosen
        # the thread stops only where no follow-up prompt was answered
        assert not any(children[g["message_id"]] for g in children[parent["message_id"]])
    assert checked > 50, "the sample has real choices to make"


def test_split_keeps_trees_whole_and_is_stable(sample_rows):
    threads, _ = extract_threads(sample_rows)
    train, evals = split_by_tree(threads, 0.1, seed=42)
    assert len(train) + len(evals) == 80 and 3 <= len(evals) <= 15
    assert not {t["tree_id"] for t in train} & {t["tree_id"] for t in evals}
    assert split_by_tree(threads, 0.1, seed=42) == (train, evals)
    assert split_by_tree(threads, 0.1, seed=1)[1] != evals


def row(mid, parent, role="prompter", text="hello", **kw):
    return {
        "message_id": mid,
        "parent_id": parent,
        "role": role,
        "text": text,
        "lang": "en",
        "rank": None,
        "deleted": False,
        "review_result": True,
        "message_tree_id": None,
        **kw,
    }


def broken_rows():
    return [
        row("r1", None, text="What is 2+2?"),
        row("a1", "r1", "assistant", "4.", rank=1),
        row("a2", "r1", "assistant", "Four.", rank=0),
        row("p2", "a2", text="And 3+3?"),
        row("a3", "p2", "assistant", "Six."),
        row("a4", "a3", "assistant", "(again) six"),  # role_order: assistant answering assistant
        row("p5", "a4", text="under a dropped message"),  # parent_dropped
        row("x1", "ghost", "assistant", "orphan"),  # missing_parent
        row("x2", "x1", text="orphan's child"),  # missing_parent (first break up the chain)
        row("e1", "r1", "assistant", "   "),  # empty_text
        row("u1", "r1", "moderator", "hm"),  # unknown_role
        row("c1", "c2", text="loop"),  # cycle
        row("c2", "c1", "assistant", "loop"),  # cycle
        row("a2", "r1", "assistant", "dup"),  # duplicate_id
        row("d1", "r1", "assistant", "deleted", deleted=True),
        row("f1", "r1", "assistant", "failed", review_result=False),
        row("f2", "f1", text="below a failed review"),  # parent_dropped
        {"text": "no id"},  # malformed
        None,  # malformed (unparsable line)
        row("r2", None, text="Bonjour", lang="fr"),
        row("b2", "r2", "assistant", "Salut"),
        row("r3", None, text="No answer yet"),  # a tree without a reply
        row("r4", None, "assistant", "an answer as a root"),  # role_order
    ]


def test_broken_rows_are_counted_by_reason_and_skipped():
    threads, stats = extract_threads(broken_rows(), languages=["en"])
    assert stats["dropped"] == {
        "malformed": 2,
        "duplicate_id": 1,
        "deleted": 1,
        "review_failed": 1,
        "empty_text": 1,
        "unknown_role": 1,
        "role_order": 2,
        "missing_parent": 2,
        "cycle": 2,
        "parent_dropped": 2,
        "language": 2,
    }
    assert set(stats["dropped"]) <= set(REASONS)
    assert [t["messages"] for t in threads] == [
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "Four."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "Six."},
        ]
    ]
    assert stats["trees"] == 2 and stats["trees_without_reply"] == 1


def test_a_broken_dataset_file_builds_through_run_py(tmp_path, tiny_phi3_hf, capsys):
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps(r) if r is not None else "{not json" for r in broken_rows()]
    good = [
        json.dumps(row(f"t{i}", None, text=f"Question {i}?"))
        + "\n"
        + json.dumps(row(f"t{i}a", f"t{i}", "assistant", f"Answer {i}."))
        for i in range(12)
    ]
    path.write_text("\n".join(lines + good) + "\n")
    out = tmp_path / "out"
    rc = data_stage(tiny_phi3_hf, path, out, "--languages", "en")
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())["data"]
    assert report["dropped"]["cycle"] == 2 and report["dropped"]["malformed"] == 2
    assert report["threads"] == 13 and report["train"]["threads"] + report["eval"]["threads"] == 13
    assert report["tokens"] > 0
    train = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (out / "data" / "eval.jsonl").read_text().splitlines()]
    assert not {t["tree_id"] for t in train} & {t["tree_id"] for t in evals}


def test_a_local_dataset_folder_uses_its_own_splits(tmp_path, sample_rows, tiny_phi3_hf, capsys):
    """Hub-style data (train/validation splits), here from a local folder: no by-tree fraction, splits kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    roots = [r["message_id"] for r in sample_rows if r["parent_id"] is None]
    held = set(roots[:10])
    folder = tmp_path / "oasst"
    (folder / "data").mkdir(parents=True)
    for split, keep in (
        ("train", lambda r: r["message_tree_id"] not in held),
        ("validation", lambda r: r["message_tree_id"] in held),
    ):
        rows = [
            {k: v for k, v in r.items() if k not in ("emojis", "labels", "detoxify")} for r in sample_rows if keep(r)
        ]
        pq.write_table(pa.Table.from_pylist(rows), folder / "data" / f"{split}-00000-of-00001.parquet")
    out = tmp_path / "out"
    rc = data_stage(tiny_phi3_hf, folder, out, "--max_train_threads", "0", "--max_eval_threads", "0")
    assert rc == 0, capsys.readouterr().err
    evals = [json.loads(x)["tree_id"] for x in (out / "data" / "eval.jsonl").read_text().splitlines()]
    assert set(evals) == held
