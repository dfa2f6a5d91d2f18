#!/bin/sh
# Runs the issue-8 benchmark: wsbridge side by side with a raw tokio-tungstenite broadcast
# server and nchan, on 127.0.0.1, printing one table (stdout; progress on stderr).
#
#   benches/run.sh                      # every scenario, full durations (~10 minutes)
#   benches/run.sh --quick              # shorter runs, fewer consumers (a smoke test)
#   benches/run.sh --only fanout,memory --systems wsbridge,raw
#
# Installs Debian's nginx-light and libnginx-mod-nchan if missing (nchan is the peer for the
# fan-out, latency and memory scenarios; benches/nchan.conf is its config). Without root or
# apt the bench still runs, without nchan.
set -eu
cd "$(dirname "$0")/.."
if [ ! -x /usr/sbin/nginx ] || [ ! -e /usr/lib/nginx/modules/ngx_nchan_module.so ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "installing nginx-light and libnginx-mod-nchan" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light libnginx-mod-nchan >&2 ||
            { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light libnginx-mod-nchan >&2; }
    else
        echo "nchan not installed and cannot install it here: nchan rows will be skipped" >&2
    fi
fi
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/Mem:/ {print $2}') GiB RAM; $(date -u '+%Y-%m-%d %H:%M UTC'); load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
exec cargo bench --bench bench -- "$@"
