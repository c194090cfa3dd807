"""A classifier with select: each label is scored by the mean log-probability of its tokens after
the prompt (all labels in one batched request that reuses the cached prompt); the scores are in
the select's meta info.

Run: python examples/classifier.py [--url http://127.0.0.1:30000]
"""

import radixlm as rl

LABELS = ["positive", "negative", "neutral"]
REVIEWS = [
    "The battery lasts for days and the screen is gorgeous.",
    "It broke after a week and support never answered.",
    "It is a phone. It makes calls.",
]


@rl.function
def classify(s, review, choices_method=rl.token_length_normalized):
    s += rl.system("You classify the sentiment of product reviews as positive, negative or neutral.")
    s += rl.user("Review: " + review)
    s += rl.assistant("Sentiment: " + rl.select("label", choices=LABELS, choices_method=choices_method))


def main(backend=None, choices_method=rl.token_length_normalized):
    states = classify.run_batch([{"review": r, "choices_method": choices_method} for r in REVIEWS],
                                backend=backend)
    for r, st in zip(REVIEWS, states):
        st.raise_for_error()
        scores = st.get_meta_info("label")["normalized_prompt_logprobs"]
        print(f"{st['label']:>8}  {dict(zip(LABELS, (round(x, 3) for x in scores)))}  {r}")
    return states


if __name__ == "__main__":
    from _backend import run_example

    run_example(main, __doc__)
