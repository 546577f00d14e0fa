"""Accuracy of trivial strategies on the cpu grid's pointer tasks (the floor the trained models are read against).

    python docs/results/expressivity/baselines.py

Uses 4,000 examples of each task from test stream (seed 0, 2), as the in-distribution test set of seed 0.
"""
import re
from collections import Counter
from hybridlm.tasks.registry import task_class
from hybridlm.tasks.splits import longer_knobs

def parse(prompt):
    lines = prompt.strip().split("\n")
    bits = None
    if lines[0].startswith("bits"):
        bits = [int(x) for x in re.findall(r"\d+", lines[0])]; lines = lines[1:]
    names, vals = lines[0].split("=")
    env = dict(zip([s.strip() for s in names.split(",")], [int(v) for v in vals.split(",")]))
    init = dict(env)
    q = re.search(r"assert (?:bits\[)?(\w)", lines[-1]).group(1)
    return bits, init, q

def run(task_name, knobs, n=4000):
    t = task_class(task_name)(**knobs)
    ex = t.dataset(n, t.rng(0, 2))
    sc = Counter()
    for e in ex:
        bits, init, q = parse(e.prompt)
        ans = int(e.answer_text)
        if bits is not None:
            sc["no_swap(bits[initial])"] += bits[init[q]] == ans
            maj = int(sum(bits) * 2 > len(bits)) if sum(bits) * 2 != len(bits) else 0
            sc["majority bit of list"] += maj == ans
            ptr = [bits[v] for v in init.values()]
            sc["majority over pointed bits"] += int(sum(ptr) * 2 > len(ptr)) == ans
            sc["const 0"] += ans == 0
        else:
            sc["no_swap(initial value)"] += init[q] == ans
    return {k: round(v / n, 3) for k, v in sc.items()}

for name, knobs in [("state_tracking", dict(m=(3, 3), k=3, max_bits=3, n=(0, 4))),
                    ("state_recall", dict(k=3, n=(0, 4), max_bits=8, m=(4, 8)))]:
    t = task_class(name)(**knobs)
    print(name, "id", run(name, knobs))
    lk = longer_knobs(t, lengthen=("n",))
    print(name, "longer", lk["n"] if "n" in lk else lk, run(name, lk))
for m in [(4, 8), (8, 16)]:
    t = task_class("bit_recall")(max_bits=16, m=m); ex = t.dataset(4000, t.rng(0, 2))
    c = 0
    for e in ex:
        bits = [int(x) for x in re.findall(r"\d+", e.prompt.split("\n")[0])]
        maj = int(sum(bits) * 2 > len(bits))
        c += maj == int(e.answer_text)
    print("bit_recall", m, "majority bit of list", c / 4000)
