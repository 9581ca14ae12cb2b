#!/usr/bin/env bash
# PNG of the asv dashboard on a machine without internet access: asv's pages load jQuery, flot and
# bootstrap from CDNs, so a copy of html/ gets the same libraries from the npm registry instead.
# Needs: npm, chromium (Debian: apt-get install chromium), `asv publish` already run.
#   bash asv_bench/screenshot.sh OUT.png ['index.html#bench_cpu.Forward.time_forward?p-shape=%27cpu-a%27']
set -euo pipefail
out=$(realpath -m "${1:?usage: screenshot.sh OUT.png [PAGE]}")
page=${2:-index.html}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$here/html" "$work/site"
(cd "$work" && npm pack -q jquery@3.3.1 flot@0.8.3 flot-orderbars@1.0.0 blueimp-md5@2.19.0 bootstrap@3.1.1 \
   stupid-table-plugin@1.1.3 >/dev/null && for f in *.tgz; do mkdir "${f%.tgz}" && tar xzf "$f" -C "${f%.tgz}"; done)
lib="$work" site="$work/site"
cp "$lib"/jquery-3.3.1/package/dist/jquery.min.js "$site"/
for f in jquery.flot.js jquery.flot.time.js jquery.flot.selection.js jquery.flot.categories.js; do
  cp "$lib/flot-0.8.3/package/$f" "$site"/
done
cp "$lib"/flot-orderbars-1.0.0/package/js/jquery.flot.orderBars.js "$lib"/stupid-table-plugin-1.1.3/package/stupidtable.min.js \
   "$lib"/blueimp-md5-2.19.0/package/js/md5.min.js "$lib"/bootstrap-3.1.1/package/dist/js/bootstrap.min.js \
   "$lib"/bootstrap-3.1.1/package/dist/css/bootstrap.min.css "$site"/
for h in "$site"/*.html; do
  # CDN address -> local file name; the integrity hashes are of the minified CDN builds, so drop them
  sed -i -E -e 's#https://[^"]*/(jquery-3\.3\.1\.min\.js)#jquery.min.js#' \
    -e 's#https://cdnjs\.cloudflare\.com/ajax/libs/flot/0\.8\.3/(jquery\.flot[a-z.]*)\.min\.js#\1.js#' \
    -e 's#https://[^"]*/(jquery\.flot\.orderBars\.js|stupidtable\.min\.js|md5\.min\.js|bootstrap\.min\.(js|css))#\1#' \
    -e 's/ integrity="[^"]*"//g' "$h"
done
port=$((20000 + RANDOM % 20000))
(cd "$site" && timeout 60 python3 -m http.server "$port" --bind 127.0.0.1 >/dev/null 2>&1) &
sleep 1
timeout 60 chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$work/chrome" --window-size=1400,1000 \
  --virtual-time-budget=8000 --screenshot="$out" "http://127.0.0.1:$port/$page" 2>/dev/null
echo "wrote $out"
