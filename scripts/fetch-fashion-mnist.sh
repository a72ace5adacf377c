#!/usr/bin/env bash
# Make Debian's Fashion-MNIST (package dataset-fashion-mnist) available to lightning_bpfree.data.
#
# Usage: scripts/fetch-fashion-mnist.sh [--user] [--prefix DIR] PYTHON
#   PYTHON        the interpreter of the environment, with lightning_bpfree installed (make venv
#                 passes .venv/bin/python)
#   --user        never use root: unpack the package into DIR/share/datasets/fashion-mnist even when
#                 the files are found elsewhere or root is available (the test of that branch)
#   --prefix DIR  where --user and the unprivileged branch unpack (default: PYTHON's sys.prefix,
#                 a folder the loader searches)
#
# Without --user: nothing happens when the loader already finds the files. Otherwise, as root (or
# with password-less sudo) apt-get update + apt-get install -y dataset-fashion-mnist; without root,
# apt-get download + dpkg -x into DIR/share/datasets/fashion-mnist (with private package lists when
# the system's are empty). Where neither works it exits 1 and prints the exact commands to run.
set -euo pipefail

user_only=0
prefix=""
while [ $# -gt 1 ]; do
  case "$1" in
    --user) user_only=1; shift ;;
    --prefix) prefix="$2"; shift 2 ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || { echo "usage: $0 [--user] [--prefix DIR] PYTHON" >&2; exit 2; }
py="$1"
package=dataset-fashion-mnist
[ -n "$prefix" ] || prefix="$("$py" -c 'import sys; print(sys.prefix)')"
dest="$prefix/share/datasets/fashion-mnist"

# The loader's own search (lightning_bpfree.data.fashion_mnist_dir), so the folders are listed once.
found() {
  "$py" -c 'import sys; from lightning_bpfree.data import fashion_mnist_dir; print(fashion_mnist_dir(*sys.argv[1:]))' "$@" \
    2>/dev/null
}

give_up() {
  cat >&2 <<EOF

Fashion-MNIST is missing and could not be fetched ($1).
Run one of these, then run make again:
  sudo apt-get update && sudo apt-get install -y $package
  apt-get download $package && dpkg -x ${package}_*.deb /tmp/fmnist && mkdir -p $dest && cp /tmp/fmnist/usr/share/datasets/fashion-mnist/*.gz $dest/
or put the four IDX .gz files of Fashion-MNIST in a folder and set FASHION_MNIST_DIR to it.
EOF
  exit 1
}

if [ "$user_only" = 0 ]; then
  if where="$(found)"; then
    echo "Fashion-MNIST: found in $where"
    exit 0
  fi
  sudo=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
  fi
  if [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; then
    echo "Fashion-MNIST: installing Debian's $package with apt-get"
    $sudo apt-get update -qq || true  # a stale list may still hold the package
    if DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$package" && found >/dev/null; then
      exit 0
    fi
    echo "Fashion-MNIST: apt-get install failed; trying without root" >&2
  fi
fi

command -v apt-get >/dev/null && command -v dpkg >/dev/null || give_up "apt-get and dpkg are not available"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "Fashion-MNIST: downloading $package and unpacking it into $dest"
# apt-get download reads the system's package lists; a fresh machine may have none, and without root
# they cannot be updated, so fall back on private lists fetched into the temporary folder.
if ! (cd "$work" && apt-get download -qq "$package" 2>/dev/null); then
  private=(-o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "Debug::NoLocking=1")
  mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
  apt-get "${private[@]}" update -qq >/dev/null 2>&1 || give_up "apt-get update into private lists failed"
  (cd "$work" && apt-get "${private[@]}" download -qq "$package") || give_up "apt-get download $package failed"
fi
dpkg -x "$work"/${package}_*.deb "$work/root"
mkdir -p "$dest"
cp "$work"/root/usr/share/datasets/fashion-mnist/*.gz "$dest/"
for split in train t10k; do
  for part in images-idx3 labels-idx1; do
    [ -s "$dest/$split-$part-ubyte.gz" ] || give_up "the package did not hold $split-$part-ubyte.gz"
  done
done
echo "Fashion-MNIST: unpacked into $dest"
