#!/usr/bin/env bash
# The layer check: every '#include "../X/..."' in a product folder must be an
# edge listed in tests/layers/edges, and every global symbol a folder's
# objects define must carry one of its prefixes (tests/layers/prefixes).
# Usage: check.sh [OBJDIR]   (OBJDIR: build/obj; without it, includes only)
set -euo pipefail
cd "$(dirname "$0")/../.."
objdir=${1:-}
fail=0

declare -A allowed prefixes
while IFS=: read -r folder deps; do
    allowed[$folder]=" $(echo $deps) "
done < <(grep -vE '^\s*(#|$)' tests/layers/edges)
while IFS=: read -r folder list; do
    prefixes[$folder]=$(echo $list)
done < <(grep -vE '^\s*(#|$)' tests/layers/prefixes)

# Every folder with C sources is a layer: a new one must be placed.
for d in $(git ls-files '*.c' '*.h' | grep -v -e '^tests/' -e '^bench/' | cut -d/ -f1 | sort -u); do
    [[ $d == *.* ]] && continue
    if [[ -z ${allowed[$d]+x} ]]; then
        echo "layers: $d/ holds C sources but is not in tests/layers/edges"
        fail=1
    fi
done

for folder in "${!allowed[@]}"; do
    while IFS= read -r hit; do
        [[ -z $hit ]] && continue
        file=${hit%%:*}
        rest=${hit#*:}
        line=${rest%%:*}
        target=$(sed -E 's/.*#include "\.\.\/([^/]+)\/.*/\1/' <<<"$rest")
        if [[ $target == "$folder" || ${allowed[$folder]} != *" $target "* ]]; then
            echo "layers: $file:$line: $folder/ may not include $target/ (allowed: ${allowed[$folder]:- none })"
            fail=1
        fi
    done < <(grep -nE '#include "\.\./' "$folder"/*.[ch] 2>/dev/null || true)
done

if [[ -n $objdir ]]; then
    for folder in "${!prefixes[@]}"; do
        # The objects of the folder's sources only: a build directory may
        # still hold the object of a file since removed.
        objs=()
        for src in "$folder"/*.c; do
            [[ -e $src && -e $objdir/${src%.c}.o ]] && objs+=("$objdir/${src%.c}.o")
        done
        [[ ${#objs[@]} -gt 0 ]] || continue
        for sym in $(nm -g --defined-only "${objs[@]}" | awk 'NF == 3 { print $3 }'); do
            ok=0
            for p in ${prefixes[$folder]}; do
                [[ $sym == "$p"* ]] && { ok=1; break; }
            done
            if [[ $ok == 0 ]]; then
                echo "layers: $folder/ defines $sym, without its prefix (${prefixes[$folder]})"
                fail=1
            fi
        done
    done
fi

if [[ $fail != 0 ]]; then
    echo "layers: FAIL (tests/layers/edges, tests/layers/prefixes, docs/architecture.md)"
    exit 1
fi
echo "layers: ok (${#allowed[@]} layers, includes${objdir:+ and symbols} checked)"
