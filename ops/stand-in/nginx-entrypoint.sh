#!/bin/sh
# Stand-in for the official nginx image's /docker-entrypoint.sh and its
# 20-envsubst-on-templates.sh: render /etc/nginx/templates/*.template into
# /etc/nginx/conf.d, substituting only the environment variables that are set.
set -eu
if [ "${1:-}" = nginx ] || [ "${1:-}" = nginx-debug ]; then
  defined=$(env | cut -d= -f1 | sed 's/.*/${&}/' | tr '\n' ' ')
  for template in /etc/nginx/templates/*.template; do
    [ -f "$template" ] || continue
    out="/etc/nginx/conf.d/$(basename "$template" .template)"
    echo "$0: rendering $template to $out"
    envsubst "$defined" < "$template" > "$out"
  done
fi
exec "$@"
