"""Writes suites/codeact/tasks.json: the project's own task suite (its version is in suite.json). Run
`python -m codeact_sdk.eval.build_suite` after changing it; the expected answers come from each task's
reference solution run against the tools, so they are exact.

Every task needs several tool calls composed. A task: id, domain, question, answer_type (number, string or
list), answer, and the reference solution (Python over the domain's tools; its last line is the answer).
"""

from __future__ import annotations

import json
import os

from .domains import DOMAINS


def decoding_tasks() -> list[tuple[str, str, str]]:
    words = ["lantern", "harbor", "meadow", "crystal", "falcon", "orchard", "thunder", "velvet", "compass",
             "glacier", "saffron", "juniper", "marble"]
    tasks = []
    for number, word in enumerate(words):
        shift = 3 + number % 7
        encoded = "".join(chr((ord(c) - 97 + shift) % 26 + 97) for c in word)
        if number % 3 == 0:
            secret = encoded[::-1].encode().hex()
            question = (f"The hex string {secret} encodes a message that was Caesar-shifted by {shift} and then "
                        "reversed. Decode the hex, reverse it, then undo the Caesar shift. What is the word?")
            code = f"caesar_decode(reverse_string(hex_to_text({secret!r})), {shift})"
        elif number % 3 == 1:
            secret = encoded.encode().hex()
            question = (f"Decode the hex string {secret} to text, then undo a Caesar shift of {shift}. "
                        "What is the word, and how many letters does it have? Answer as 'word,length'.")
            code = f"caesar_decode(hex_to_text({secret!r}), {shift}) + ',' + str(len(hex_to_text({secret!r})))"
        else:
            reversed_secret = encoded[::-1]
            question = (f"The text '{reversed_secret}' is a word that was Caesar-shifted by {shift} and reversed. "
                        "Recover the word, then give it back in upper case, reversed.")
            code = f"reverse_string(caesar_decode(reverse_string({reversed_secret!r}), {shift})).upper()"
        tasks.append((question, "list" if "length" in question else "string", code))
    return tasks


def units_tasks() -> list[tuple[str, str, str]]:
    specs = [("apples", 3, "kg", 10, 8), ("coffee", 500, "g", 15, 20), ("rice", 4, "lb", 0, 5.5),
             ("cheese", 750, "g", 20, 10), ("tea", 8, "oz", 5, 19), ("flour", 2.5, "kg", 25, 7),
             ("sugar", 3, "lb", 10, 0), ("olive oil", 1500, "ml", 12, 21), ("apples", 2, "lb", 30, 6),
             ("coffee", 2, "lb", 5, 12), ("cheese", 12, "oz", 0, 9)]
    tasks = []
    for item, amount, unit, discount, tax in specs:
        base = "l" if item == "olive oil" else "kg"
        question = (f"How much do {amount} {unit} of {item} cost in euros, with a {discount}% discount and then "
                    f"{tax}% tax added? Round to 2 decimals.")
        solution = (f"round(add_tax(apply_discount(get_price({item!r}) * convert_units({amount}, {unit!r}, "
                    f"{base!r}), {discount}), {tax}), 2)")
        tasks.append((question, "number", solution))
    tasks.append(("A runner covers 26.2 mi. How many km is that, and how many ft? Answer 'km,ft', each rounded to 1 "
                  "decimal.", "list",
                  "str(round(convert_units(26.2, 'mi', 'km'), 1)) + ',' + "
                  "str(round(convert_units(26.2, 'mi', 'ft'), 1))"))
    tasks.append(("Which costs more per pound, tea or coffee, and by how many euros per pound (2 decimals)? Answer "
                  "'item,difference'.", "list",
                  "'coffee,' + str(round((get_price('coffee') - get_price('tea')) * convert_units(1, 'lb', 'kg'), 2))"))
    return tasks


def dna_tasks() -> list[tuple[str, str, str]]:
    sequences = ["ATGGCCATTGTAATGGGCCGCTGAAAGGGTGCCCGATAG",
                 "ATGAAACGCATTAGCACCACCATTACCACCACCATCACCATTACCACAGGTAACGG",
                 "ATGCGTACGTTAGCCTAGGCT", "ATGTTTGGCAAAGCGTGGTAA", "ATGCCCGGGAAATTTCCCTGA", "ATGGATCCATAGGCTTAA",
                 "ATGACCGTTGCAGGATAACCG", "ATGTGGTGCTACCAATAGCCC", "ATGCACCACCACCACCACTGA", "ATGATGATGCGCGCGTAG",
                 "ATGGGGCCCAAATTTGGGTGA", "ATGTCTTCTGGTGGTTAA"]
    tasks = []
    for number, sequence in enumerate(sequences):
        kind = number % 4
        if kind == 0:
            question = (f"Transcribe the DNA sequence {sequence} to RNA and translate it to a protein. "
                        "What is the protein?")
            solution, answer_type = f"translate(transcribe({sequence!r}))", "string"
        elif kind == 1:
            question = (f"What is the GC content (percent, 2 decimals) of the reverse complement of {sequence}?")
            solution, answer_type = f"round(gc_content(reverse_complement({sequence!r})), 2)", "number"
        elif kind == 2:
            question = (f"Take the reverse complement of {sequence}, transcribe it to RNA, and give the first 9 bases "
                        "of the RNA.")
            solution, answer_type = f"transcribe(reverse_complement({sequence!r}))[:9]", "string"
        else:
            question = (f"Translate {sequence} (transcribe it first) and give the protein length and its GC content "
                        "(percent, 1 decimal) as 'length,gc'.")
            solution = (f"str(len(translate(transcribe({sequence!r})))) + ',' + "
                        f"str(round(gc_content({sequence!r}), 1))")
            answer_type = "list"
        tasks.append((question, answer_type, solution))
    return tasks


def travel_tasks() -> list[tuple[str, str, str]]:
    tasks = [
        ("What is the cheapest flight from Paris to Rome, and what does it cost with 3 nights in a Rome hotel? "
         "Answer 'flight,total'.", "list",
         "f = min(find_flights('Paris', 'Rome'), key=lambda x: x['price'])\n"
         "f['flight'] + ',' + str(f['price'] + get_hotel_price('Rome', 3))"),
        ("I fly Paris to Berlin, then Berlin to Oslo. What do the two flights cost together, plus 2 nights in Oslo?",
         "number", "find_flights('Paris', 'Berlin')[0]['price'] + find_flights('Berlin', 'Oslo')[0]['price'] + "
                   "get_hotel_price('Oslo', 2)"),
        ("Which is cheaper to reach Rome from: Berlin or Madrid (direct flights)? Answer with the city and the price "
         "difference as 'city,difference'.", "list",
         "b = min(f['price'] for f in find_flights('Berlin', 'Rome'))\n"
         "m = min(f['price'] for f in find_flights('Madrid', 'Rome'))\n"
         "('Berlin' if b < m else 'Madrid') + ',' + str(abs(b - m))"),
        ("What is the population of the country's city I reach on the Madrid to Lisbon flight, and what time does the "
         "flight arrive? Answer 'population,arrival'.", "list",
         "str(get_city_info('Lisbon')['population']) + ',' + find_flights('Madrid', 'Lisbon')[0]['arrive']"),
        ("A round trip Rome to Athens and back on direct flights, with 4 nights in Athens: total cost in euros?",
         "number", "find_flights('Rome', 'Athens')[0]['price'] + find_flights('Athens', 'Rome')[0]['price'] + "
                   "get_hotel_price('Athens', 4)"),
        ("Which of Paris's direct destinations has the cheapest hotel per night? Give the city.", "string",
         "cities = {'Rome', 'Berlin', 'Madrid', 'Oslo'}\nmin(cities, key=lambda c: get_hotel_price(c, 1))"),
        ("How many direct flights leave Paris, and what is their average price (1 decimal)? Answer 'count,average'.",
         "list", "prices = [f['price'] for d in ['Rome', 'Berlin', 'Madrid', 'Oslo'] for f in "
                 "find_flights('Paris', d)]\nstr(len(prices)) + ',' + str(round(sum(prices) / len(prices), 1))"),
        ("Going Paris to Athens via Rome on the cheapest flights: what is the total flight cost?", "number",
         "min(f['price'] for f in find_flights('Paris', 'Rome')) + find_flights('Rome', 'Athens')[0]['price']"),
        ("What is the combined population of Berlin and Oslo, and are they in the same timezone? Answer "
         "'population,yes' or 'population,no'.", "list",
         "a, b = get_city_info('Berlin'), get_city_info('Oslo')\n"
         "str(a['population'] + b['population']) + ',' + ('yes' if a['timezone'] == b['timezone'] else 'no')"),
        ("Five nights in Madrid or five nights in Lisbon plus the Madrid to Lisbon flight: which is cheaper, and by "
         "how much? Answer 'option,difference' with option madrid or lisbon.", "list",
         "m = get_hotel_price('Madrid', 5)\n"
         "l = get_hotel_price('Lisbon', 5) + find_flights('Madrid', 'Lisbon')[0]['price']\n"
         "('madrid' if m < l else 'lisbon') + ',' + str(abs(m - l))"),
        ("What is the earliest departure among the flights out of Paris, and its destination? Answer "
         "'time,destination'.", "list",
         "fl = [f for d in ['Rome', 'Berlin', 'Madrid', 'Oslo'] for f in find_flights('Paris', d)]\n"
         "e = min(fl, key=lambda f: f['depart'])\ne['depart'] + ',' + e['destination']"),
        ("Lisbon to Paris, then the cheapest Paris to Rome flight, then 2 nights in Rome: total cost?", "number",
         "find_flights('Lisbon', 'Paris')[0]['price'] + min(f['price'] for f in find_flights('Paris', 'Rome')) + "
         "get_hotel_price('Rome', 2)"),
    ]
    return tasks


def web_tasks() -> list[tuple[str, str, str]]:
    # Each solution reads its figures off the pages through the tools, as an agent must.
    page = "import re\nsite = 'https://example.org'\n"
    return [
        ("On the museum site at https://example.org/, in what year was the museum founded, and by whom? Answer "
         "'year,name'.", "list",
         page + "','.join(re.search(r'founded in (\\d{4}) by (\\w+ \\w+)', fetch_page(site + '/history')).groups())"),
        ("How many items are in the museum's collections in total (https://example.org/)?", "number",
         page + "sum(int(n.replace(',', '')) for n in re.findall(r'\\(([\\d,]+) items\\)', "
         "fetch_page(site + '/collections')))"),
        ("Who curates the clock collection, and what is that person's title on the staff page? Answer "
         "'name,title'.", "list",
         page + "curator = re.search(r'curated by (\\w+ \\w+)', fetch_page(site + '/collections')).group(1)\n"
         "curator + ',' + re.search(r'([A-Z][\\w ]+?): ' + curator, fetch_page(site + '/staff')).group(1)"),
        ("What does a visit cost for 2 adults and 3 children, buying the family ticket plus what is needed? "
         "(https://example.org/)", "number",
         page + "visit = fetch_page(site + '/visit')\n"
         "ticket = lambda kind: int(re.search(kind + r' ticket[^:]*: (\\d+) euros', visit).group(1))\n"
         "ticket('Family') + ticket('Child')"),
        ("How many years after its founding did the museum move to its current building?", "number",
         page + "history = fetch_page(site + '/history')\n"
         "year = lambda event: int(re.search(event + r' (\\d{4})', history).group(1))\n"
         "year('current building in') - year('founded in')"),
        ("How old was the oldest globe when the museum was founded?", "number",
         page + "int(re.search(r'founded in (\\d{4})', fetch_page(site + '/history')).group(1)) - "
         "int(re.search(r'made in (\\d{4})', fetch_page(site + '/collections/globes')).group(1))"),
        ("Which event on the museum site is free, and on what date? Answer 'event,date'.", "list",
         page + "','.join(re.search(r'(?:: |, )([^,:]+?) on (\\d+ \\w+) \\(free\\)', "
         "fetch_page(site + '/events')).groups())"),
        ("How many hours a day is the museum open (1 decimal)?", "number",
         page + "h1, m1, h2, m2 = map(int, re.search(r'(\\d\\d):(\\d\\d) to (\\d\\d):(\\d\\d)', "
         "fetch_page(site + '/visit')).groups())\n"
         "round((h2 * 60 + m2 - h1 * 60 - m1) / 60, 1)"),
        ("What do tickets for the map night and the clock repair workshop cost together for one person?", "number",
         page + "events = fetch_page(site + '/events')\n"
         "sum(int(re.search(name + r' on [^(]*\\(tickets (\\d+) euros', events).group(1)) "
         "for name in ('Map night', 'Clock repair workshop'))"),
        ("How many years had the director been in post in 2024?", "number",
         page + "2024 - int(re.search(r'Director: [^(]+\\(since (\\d{4})\\)', fetch_page(site + '/staff')).group(1))"),
        ("Which collection has the fewest items, and how many? Answer 'collection,items'.", "list",
         page + "collections = re.findall(r'(\\w+) \\(([\\d,]+) items\\)', fetch_page(site + '/collections'))\n"
         "name, items = min(collections, key=lambda pair: int(pair[1].replace(',', '')))\n"
         "name + ',' + items"),
        ("How many years separate the oldest clock and the oldest globe?", "number",
         page + "int(re.search(r'made in (\\d{4})', fetch_page(site + '/collections/globes')).group(1)) - "
         "int(re.search(r'dates from (\\d{4})', fetch_page(site + '/collections/clocks')).group(1))"),
        ("Search the site for the page that mentions 'tower clocks' and give how many tower clocks there are.",
         "number", "import re\n(url,) = search_site('tower clocks')\n"
         "int(re.search(r'(\\d+) tower clocks', fetch_page(url)).group(1))"),
    ]


BUILDERS = {"decoding": decoding_tasks, "units": units_tasks, "dna": dna_tasks, "travel": travel_tasks,
            "web": web_tasks}


def evaluate(domain: str, solution: str) -> object:
    """Run a reference solution against the domain's tools; the last line's value is the answer."""
    namespace = {tool.__name__: tool for tool in DOMAINS[domain].TOOLS}
    lines = solution.strip().split("\n")
    exec("\n".join(lines[:-1]), namespace)
    return eval(lines[-1], namespace)


def build() -> dict:
    tasks = []
    for domain, builder in BUILDERS.items():
        for number, (question, answer_type, solution) in enumerate(builder(), 1):
            answer = evaluate(domain, solution)
            tasks.append({"id": f"{domain}-{number:02d}", "domain": domain, "question": question,
                          "answer_type": answer_type, "answer": answer, "solution": solution})
    return {"tasks": tasks}


def main() -> None:
    suite = build()
    path = os.path.join(os.path.dirname(__file__), "suites", "codeact", "tasks.json")
    with open(path, "w") as handle:
        json.dump(suite, handle, indent=1)
        handle.write("\n")
    print(f"wrote {len(suite['tasks'])} tasks to {path}")


if __name__ == "__main__":
    main()
