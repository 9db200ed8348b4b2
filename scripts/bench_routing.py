"""Routing speed: 10,000 mails against generated rules with 50 departments and 500 keywords.

    .venv/bin/python scripts/bench_routing.py [--mails 10000] [--departments 50] [--keywords 500]

Measured in the same run, on the same mails:
  triage   parse -> understand -> route -> disclose for each mail (what `mailbot triage` does
           per mail, without the database lookup: known transactions come from a dict)
  route    ``route.route`` alone, on the Understandings from the triage pass
Prints mails/s of both and the share of triage time spent in routing (target < 20%).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mailbot.disclose import disclosed, reply_template  # noqa: E402
from mailbot.parse import parse_mail  # noqa: E402
from mailbot.route import route  # noqa: E402
from mailbot.rules import Department, Lines, Match, RoutingRule, Rules, Texts, load_rules  # noqa: E402
from mailbot.settings import SHIPPED_RULES  # noqa: E402
from mailbot.transactions import KnownTransaction  # noqa: E402
from mailbot.understand import understand  # noqa: E402

ARABIC_LETTERS = "ابتثجحخدذرزسشصضطظعغفقكلمنهوي"
FILLER_AR = ("السلام عليكم ورحمة الله وبركاته أرجو التكرم بالإفادة عن الموضوع المذكور وشكرا لكم على "
             "تعاونكم وتقبلوا تحياتي").split()
FILLER_EN = "dear sir please could you tell me what happened with my request thank you kind regards".split()


def generated_rules(departments: int, keywords: int, rng: random.Random) -> Rules:
    shipped = load_rules(SHIPPED_RULES)
    made = []
    for index in range(departments - 1):  # the last is `general`, which has no keywords
        per = keywords // (departments - 1) + (index < keywords % (departments - 1))
        words_ar = ["".join(rng.choice(ARABIC_LETTERS) for _ in range(rng.randint(4, 7))) for _ in range(per // 2)]
        words_en = [f"topic{index}x{n}" for n in range(per - per // 2)]
        made.append(Department(id=f"dept{index}", name=Texts(ar=f"إدارة {index}", en=f"Department {index}"),
                               aliases=[f"dept{index}@emirate.example"], queue=f"dept{index}-queue@emirate.example",
                               keywords=Lines(ar=words_ar, en=words_en)))
    made.append(shipped.department("general"))
    routing = [RoutingRule(id=f"domain{n}", match=Match(sender_domain=[f"partner{n}.example"]),
                           department=f"dept{n}") for n in range(10)]
    routing.append(RoutingRule(id="urgent", match=Match(regex=r"(?i)\burgent\b", language="en"),
                               department="dept0", priority="high"))
    routing += shipped.routing
    return shipped.model_copy(update={"departments": made, "routing": routing})


def generated_mail(index: int, rules: Rules, rng: random.Random) -> bytes:
    department = rng.choice(rules.departments[:-1])
    arabic = rng.random() < 0.6
    words = list(FILLER_AR if arabic else FILLER_EN) * 3
    rng.shuffle(words)
    keyword_pool = department.keywords.ar if arabic else department.keywords.en
    for _ in range(rng.randint(0, 2)):
        words.insert(rng.randrange(len(words)), rng.choice(keyword_pool))
    if rng.random() < 0.5:
        words.insert(rng.randrange(len(words)), f"1446/{rng.randint(0, 99999):05d}")
    to = f"dept{rng.randrange(49)}@emirate.example" if rng.random() < 0.2 else "inquiries@emirate.example"
    body = " ".join(words) + "\n\n> " + " ".join(rng.sample(FILLER_EN, 5)) + "\n"
    return (f"From: Citizen {index} <citizen{index}@mail.example>\nTo: {to}\nSubject: استفسار {index}\n"
            f"Message-ID: <bench-{index}@mail.example>\nDate: Thu, 23 Jan 2025 09:30:00 +0300\n"
            "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
            + body).encode("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mails", type=int, default=10_000)
    parser.add_argument("--departments", type=int, default=50)
    parser.add_argument("--keywords", type=int, default=500)
    args = parser.parse_args()
    rng = random.Random(5)
    rules = generated_rules(args.departments, args.keywords, rng)
    mails = [generated_mail(index, rules, rng) for index in range(args.mails)]
    known = {f"1446/{n:05d}": KnownTransaction(f"1446/{n:05d}", f"dept{n % 49}", "received", ())
             for n in range(0, 100_000, 3)}
    route(understand(parse_mail(mails[0]), rules), rules, known)  # compile the keyword matchers once

    started = time.perf_counter()
    understood = []
    routed_by: dict[str, int] = {}
    for raw in mails:
        u = understand(parse_mail(raw), rules)
        decision = route(u, rules, known)
        reply_template(u, decision, disclosed(u, rules, known))
        understood.append(u)
        routed_by[decision.rule] = routed_by.get(decision.rule, 0) + 1
    triage_seconds = time.perf_counter() - started

    started = time.perf_counter()
    for u in understood:
        route(u, rules, known)
    route_seconds = time.perf_counter() - started

    keywords = sum(len(d.keywords.ar) + len(d.keywords.en) for d in rules.departments)
    print(f"rules: {len(rules.departments)} departments, {keywords} keywords, {len(rules.routing)} admin rules")
    print(f"mails: {len(mails)}; decided by: " + ", ".join(f"{k}={v}" for k, v in sorted(routed_by.items())))
    print(f"triage (parse+understand+route+disclose): {triage_seconds:.2f} s, {len(mails) / triage_seconds:,.0f} mails/s")
    print(f"route alone: {route_seconds:.3f} s, {len(mails) / route_seconds:,.0f} mails/s")
    share = route_seconds / triage_seconds
    print(f"share of triage time spent in routing: {share:.1%} (target < 20%: {'ok' if share < 0.2 else 'MISSED'})")


if __name__ == "__main__":
    main()
