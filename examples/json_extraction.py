"""Structured extraction: fields constrained by regex, a record constrained by a JSON schema, and
an integer with gen_int. Every output parses, whatever the model (even random weights).

Run: python examples/json_extraction.py [--url http://127.0.0.1:30000]
"""

import json

import radixlm as rl

NAME_REGEX = r"[A-Z][a-z]{1,9}"
PHONE_REGEX = r"[0-9]{3}-[0-9]{4}"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["Alice", "Bob", "Carol"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "member"],
    "additionalProperties": False,
}
DOCUMENTS = [
    "Alice (34) lives in Paris and has been a member since 2019. Call her at 555-0134.",
    "Bob, 27, moved to Tokyo last year; he is not a member. Phone: 555-0199.",
]


@rl.function
def extract(s, document):
    s += rl.system("You extract structured data from text.")
    s += rl.user("Extract the person's details from this text:\n" + document)
    s += rl.assistant_begin()
    s += "Name: " + rl.gen("name", regex=NAME_REGEX, max_tokens=12) + "\n"
    s += "Phone: " + rl.gen("phone", regex=PHONE_REGEX, max_tokens=12) + "\n"
    s += "Age: " + rl.gen_int("age", max_tokens=6) + "\n"
    s += "Record: " + rl.gen("record", json_schema=SCHEMA, max_tokens=96)
    s += rl.assistant_end()


def main(backend=None):
    states = extract.run_batch([{"document": d} for d in DOCUMENTS], temperature=0, backend=backend)
    results = []
    for st in states:
        st.raise_for_error()
        rec = {"name": st["name"], "phone": st["phone"], "age": int(st["age"]), "record": json.loads(st["record"])}
        print(rec)
        results.append(rec)
    return states, results


if __name__ == "__main__":
    from _backend import run_example

    run_example(main, __doc__)
