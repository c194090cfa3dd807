"""Multi-turn chat: roles rendered with the model's chat template, one gen per assistant turn.

Run: python examples/chat_multi_turn.py [--url http://127.0.0.1:30000]
"""

import radixlm as rl

QUESTIONS = ["What is a radix tree?", "Why does it help an LLM server?", "Summarise that in one line."]


@rl.function
def multi_turn_chat(s, questions, max_tokens=24):
    s += rl.system("You are a helpful assistant. Answer briefly and precisely.")
    for i, q in enumerate(questions):
        s += rl.user(q)
        s += rl.assistant(rl.gen(f"answer_{i}", max_tokens=max_tokens, stop="\n\n"))


def main(backend=None, stream: bool = False):
    state = multi_turn_chat.run(questions=QUESTIONS, temperature=0, backend=backend, stream=stream)
    if stream:
        for chunk in state.text_iter():
            print(chunk, end="", flush=True)
        print()
    state.raise_for_error()
    for m in state.messages():
        print(f"{m['role']:>9}: {m['content']!r}")
    return state


if __name__ == "__main__":
    from _backend import run_example

    run_example(main, __doc__, stream=True)
