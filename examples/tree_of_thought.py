"""Tree-of-thought style branching: fork(3) explores three approaches in parallel from the same
prefix (cached once), each branch judges its own approach with select, join gathers the
branches' variables back as lists, and a final answer is generated from all of them.

Run: python examples/tree_of_thought.py [--url http://127.0.0.1:30000]
"""

import radixlm as rl

SYSTEM = ("You are a careful problem solver. You explore several approaches, judge each one honestly, "
          "and then combine the best ideas into a final answer.")


@rl.function
def tree_of_thought(s, question, num_branches=3):
    s += rl.system(SYSTEM)
    s += rl.user(question)
    s += rl.assistant_begin()
    s += "Let me think about this in several ways.\n"
    forks = s.fork(num_branches)
    forks += lambda i: f"Approach {i + 1}: " + rl.gen("thought", max_tokens=16, stop="\n")
    forks += "\nIs this approach sound? " + rl.select("verdict", choices=["yes", "no"])
    forks.join()
    s += "Summary of the approaches:\n"
    for i, (thought, verdict) in enumerate(zip(s["thought"], s["verdict"])):
        s += f"{i + 1}. {thought} (sound: {verdict})\n"
    s += "Final answer: " + rl.gen("answer", max_tokens=16)
    s += rl.assistant_end()


def main(backend=None, question="How many prime numbers are there below 20?"):
    state = tree_of_thought.run(question=question, temperature=0, backend=backend)
    state.raise_for_error()
    for i, (t, v) in enumerate(zip(state["thought"], state["verdict"])):
        print(f"branch {i}: thought={t!r} verdict={v}")
    print("final:", repr(state["answer"]))
    return state


def main_with_trace(backend):
    print(tree_of_thought.trace(backend=backend))
    return main(backend)


if __name__ == "__main__":
    from _backend import run_example

    run_example(main_with_trace, __doc__)
