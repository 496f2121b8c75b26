"""Optional judged comparison (recipe `judge_model`, off by default): a local chat model reads a held-out prompt and
two answers, the base's and the fine-tune's, and says which is better, once in each order so that a judge's
preference for the first (or second) position cancels out. Per prompt: the fine-tune wins if it is preferred in both
orders, or in one with a tie in the other; it loses likewise; any other pair is a tie. The report gives win/tie/loss
and a bootstrap interval of the win rate (wins + half the ties, over prompts).

Meant for a GPU box with a judge much stronger than the models judged; on CPU it runs, slowly.
"""

from __future__ import annotations

import re

from ggufchat.votes import win_tie_loss  # one implementation: the Space's vote tally uses it too

from .common import log

JUDGE_PROMPT = """You compare two answers of AI assistants to a user's message.

[User message]
{prompt}

[Answer A]
{a}

[Answer B]
{b}

Which answer is more helpful, correct and clear? Reply with exactly one of: A, B, tie."""

# One verdict per order, each "A", "B" or "tie" (anything else the judge says counts as a tie).
Verdict = str


def parse_verdict(text: str) -> Verdict:
    """The judge's first word that is A, B or tie (case-insensitive); 'tie' if there is none."""
    m = re.search(r"\b(A|B|tie)\b", text, flags=re.IGNORECASE)
    if not m:
        return "tie"
    word = m.group(1)
    return "tie" if word.lower() == "tie" else word.upper()


def outcome(base_first: Verdict, finetuned_first: Verdict) -> int:
    """The fine-tune's result on one prompt, +1 win, 0 tie, -1 loss, from the verdicts of the two orders:
    `base_first` judged (A=base, B=fine-tune), `finetuned_first` judged (A=fine-tune, B=base)."""
    score = lambda v, ours: 0 if v == "tie" else (1 if v == ours else -1)  # noqa: E731
    total = score(base_first, "B") + score(finetuned_first, "A")
    return (total > 0) - (total < 0)


def judge(judge_model: str, prompts: list[str], base: list[str], finetuned: list[str], seed: int = 0) -> dict:
    """Judge each (prompt, base answer, fine-tuned answer) in both orders with transformers' greedy generate on a
    local model; returns win_tie_loss(...) plus the raw verdicts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(judge_model)
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        judge_model, dtype=torch.bfloat16 if cuda else torch.float32, device_map={"": 0} if cuda else None
    ).eval()

    def ask(prompt: str, a: str, b: str) -> tuple[Verdict, str]:
        messages = [{"role": "user", "content": JUDGE_PROMPT.format(prompt=prompt, a=a, b=b)}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = {k: v.to(model.device) for k, v in ids.items()}
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        return parse_verdict(text), text

    verdicts, outcomes = [], []
    for i, (p, b, f) in enumerate(zip(prompts, base, finetuned)):
        (v1, t1), (v2, t2) = ask(p, b, f), ask(p, f, b)
        verdicts.append({"base_first": v1, "finetuned_first": v2, "raw": [t1, t2]})
        outcomes.append(outcome(v1, v2))
        log(f"[evaluate] judge {i + 1}/{len(prompts)}: base-first {v1}, fine-tune-first {v2}")
    model = None  # the judge's weights go now, not at the next stage
    return {"judge_model": judge_model, **win_tie_loss(outcomes, seed=seed), "verdicts": verdicts}
