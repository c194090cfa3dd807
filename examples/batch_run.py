"""run_batch of 32 programs with a progress bar. The programs share a long system prompt: run_batch
traces them, sends the common prefix once, and every program's gen then starts with a cache hit
(meta info `cached_tokens`).

Run: python examples/batch_run.py [--url http://127.0.0.1:30000]
"""

import radixlm as rl

SYSTEM = ("You are a concise assistant for a trivia night. Answer each question with a single short "
          "phrase, without explanations, and never refuse to answer.")
TOPICS = ["rivers", "mountains", "planets", "composers", "painters", "languages", "rivers of Asia", "deserts"]
QUESTIONS = [f"Name one famous example of {t} (variant {i})." for i in range(4) for t in TOPICS]


@rl.function
def trivia(s, question):
    s += rl.system(SYSTEM)
    s += rl.user(question)
    s += rl.assistant(rl.gen("answer", max_tokens=8))


def main(backend=None, n: int = 32, progress_bar: bool = True):
    states = trivia.run_batch([{"question": q} for q in QUESTIONS[:n]], temperature=0, backend=backend,
                              progress_bar=progress_bar)
    failed = [i for i, st in enumerate(states) if st.error() is not None]
    cached = [st.get_meta_info("answer")["cached_tokens"] for st in states if st.error() is None]
    print(f"{len(states) - len(failed)}/{len(states)} programs done; cached tokens per program: {cached}")
    return states


if __name__ == "__main__":
    from _backend import run_example

    run_example(main, __doc__)
