"""Many visitors against the real app (`python app.py`, PARALLEL=4) over HTTP: four stream at once, the others wait
with their place shown, and every one is answered."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import DEFAULT_SAMPLING, SYSTEM, THINGS, stats
from serving import app_server

pytestmark = pytest.mark.slow

VISITORS, SEATS, MAX_TOKENS = 16, 4, 64


def test_sixteen_visitors_four_seats(tmp_path, smollm2_gguf):
    env = {"MODEL_PATH": str(smollm2_gguf), "N_CTX": "1024", "PARALLEL": str(SEATS), "QUEUE_SIZE": str(VISITORS)}
    with app_server(tmp_path, env) as server:
        def visit(i: int) -> list[tuple[float, str]]:
            # A long story: SmolLM2 writes hundreds of tokens for it, so every answer runs to MAX_TOKENS.
            job = server.client().submit(f"Write a long story about {THINGS[i]}.", smollm2_gguf.name, SYSTEM,
                                         MAX_TOKENS, *DEFAULT_SAMPLING, api_name="/chat")
            return [(time.perf_counter(), update) for update in job]

        with ThreadPoolExecutor(VISITORS) as pool:
            visits = list(pool.map(visit, range(VISITORS)))
        assert server.process.poll() is None

    finals = [updates[-1][1] for updates in visits]
    assert all(stats(f)["generated"] == MAX_TOKENS for f in finals), finals  # none lost, none cut short
    waited = [v for v in visits if any(u.startswith("⏳ Waiting for the model") for _, u in v)]
    seated = [v for v in visits if v not in waited]
    # Exactly the seats were taken at once; everyone else was told how many chats must finish before theirs.
    assert len(seated) == SEATS and len(waited) == VISITORS - SEATS
    for v in waited:
        places = [int(u.split(": ")[1].split()[0]) for _, u in v if u.startswith("⏳")]
        assert all(1 <= p <= VISITORS - SEATS for p in places) and places == sorted(places, reverse=True)
    # The seated four streamed at the same time: each had its first words before any of them was finished.
    first_words = [next(t for t, u in v if not u.startswith("⏳")) for v in seated]
    finished = [v[-1][0] for v in seated]
    assert max(first_words) < min(finished)
