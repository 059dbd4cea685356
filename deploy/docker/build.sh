#!/usr/bin/env bash
# Builds Tentacle's container images without pulling anything: every image is
# `FROM scratch`, holding statically linked binaries and, for the agent, a
# static bash and busybox from Debian's packages.
#
#   deploy/docker/build.sh [--binaries DIR] [--tag TAG] [--no-strip]
#
# Debian packages (apt-get download, cached): bash-static, busybox-static,
# tini (its tini-static), tinyproxy-bin, and etcd-server unless it is
# installed on this host.
# Images: tentacle-agent, tentacle-hub, tentacle-sim, tentacle-test-proxy,
# tentacle-test-etcd (all :TAG).
# See deploy/docker/README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: deploy/docker/build.sh [--binaries DIR] [--tag TAG] [--no-strip]

Builds tentacle-agent, tentacle-hub, tentacle-sim, tentacle-test-proxy and
tentacle-test-etcd, all FROM scratch.

  --binaries DIR  Use the static tentacle, tentacle-hub and tentacle-sim already in DIR
                  (e.g. target/x86_64-unknown-linux-gnu/debug). Without it, builds them:
                  CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
                    cargo build --release --target x86_64-unknown-linux-gnu --bins
  --tag TAG       The images' tag (default: the workspace version).
  --no-strip      Keep the binaries' debug info (line tables) in the images; by default
                  the images get copies with the debug sections stripped (symbols stay).
  -h, --help      This text.

Environment:
  TENTACLE_DEB_CACHE  Where downloaded .deb files are kept between runs
                      (default: ${XDG_CACHE_HOME:-~/.cache}/tentacle/debs).
  DOCKER              The docker client to run (default: docker).
  ETCD_BINARY         The etcd for tentacle-test-etcd (default: /usr/bin/etcd when Debian's
                      etcd-server package is installed, else that package is downloaded).
EOF
}

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }
run() { printf '+ %s\n' "$*" >&2; "$@"; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DOCKERFILES="$REPO/deploy/docker"
DOCKER=${DOCKER:-docker}
TARGET=x86_64-unknown-linux-gnu
BINARIES=""
TAG=""
STRIP=1

while [ $# -gt 0 ]; do
    case "$1" in
        --binaries) [ $# -ge 2 ] || die "--binaries needs a directory"; BINARIES=$2; shift 2 ;;
        --binaries=*) BINARIES=${1#*=}; shift ;;
        --tag) [ $# -ge 2 ] || die "--tag needs a value"; TAG=$2; shift 2 ;;
        --tag=*) TAG=${1#*=}; shift ;;
        --no-strip) STRIP=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

# The workspace's version and repository, from [workspace.package] in Cargo.toml.
workspace_field() {
    sed -n '/^\[workspace\.package\]/,/^\[/ s/^'"$1"' *= *"\(.*\)".*/\1/p' "$REPO/Cargo.toml" | head -n 1
}
VERSION=$(workspace_field version)
SOURCE=$(workspace_field repository)
[ -n "$VERSION" ] || die "cannot read the version from [workspace.package] in $REPO/Cargo.toml"
TAG=${TAG:-$VERSION}
REVISION=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)

for tool in "$DOCKER" apt-get dpkg-deb ldd; do
    command -v "$tool" >/dev/null || die "'$tool' is not installed (needed to build the images)"
done
"$DOCKER" version --format '{{.Server.Version}}' >/dev/null 2>&1 \
    || die "cannot reach the Docker engine ('$DOCKER version' failed); is dockerd running and may this user use it?"

# --- binaries -----------------------------------------------------------------
if [ -z "$BINARIES" ]; then
    say "building the static release binaries"
    (cd "$REPO" && run env CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --target "$TARGET" --bins)
    BINARIES="${CARGO_TARGET_DIR:-$REPO/target}/$TARGET/release"
fi
# A relative --binaries is taken from the current directory, else from the
# repository's root (the test suite runs in tests/).
if dir=$(cd "$BINARIES" 2>/dev/null && pwd); then
    BINARIES=$dir
elif [ "${BINARIES#/}" = "$BINARIES" ] && dir=$(cd "$REPO/$BINARIES" 2>/dev/null && pwd); then
    BINARIES=$dir
else
    die "--binaries: no such directory: $BINARIES"
fi

# Succeeds when $1 is a statically linked ELF executable.
is_static() {
    [ "$(head -c 4 "$1" | od -An -c | tr -d ' ')" = '177ELF' ] || return 1
    local out
    out=$(LC_ALL=C ldd "$1" 2>&1 || true)
    case "$out" in
        *"not a dynamic executable"*|*"statically linked"*) return 0 ;;
    esac
    if command -v file >/dev/null; then
        case "$(file -b "$1")" in *"statically linked"*|*"static-pie linked"*) return 0 ;; esac
    fi
    return 1
}
for bin in tentacle tentacle-hub tentacle-sim; do
    [ -x "$BINARIES/$bin" ] || die "$BINARIES/$bin is missing; build it with --target $TARGET (see --help)"
    is_static "$BINARIES/$bin" || die "$BINARIES/$bin is not statically linked; build it with CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --target $TARGET"
done
say "binaries: $BINARIES (static)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tentacle-images.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
say "staging in $WORK"

# --- Debian packages ------------------------------------------------------------
DEB_CACHE=${TENTACLE_DEB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tentacle/debs}
mkdir -p "$DEB_CACHE"
APT_OPTS=()
# As root, apt hands downloads to the `_apt` user, which cannot write into a
# private directory; it would fall back to root with a warning. Say so upfront.
[ "$(id -u)" = 0 ] && APT_OPTS=(-o APT::Sandbox::User=root)

# Prints "URL FILE SHA256" for the candidate version of package $1.
deb_uri() {
    apt-get "${APT_OPTS[@]}" download --print-uris "$1" 2>/dev/null \
        | sed -n "s/^'\([^']*\)' \([^ ]*\) [0-9]* SHA256:\([0-9a-f]*\)$/\1 \2 \3/p" | head -n 1 || true
}
APT_UPDATED=0
apt_update() {
    [ "$APT_UPDATED" = 0 ] || return 0
    APT_UPDATED=1
    if [ "$(id -u)" = 0 ]; then
        run apt-get update -qq
    else
        say "apt-get update needs root; run it (sudo apt-get update) if the download keeps failing"
    fi
}
# Downloads package $1 (Debian's candidate version) into the cache unless it is
# there with the right checksum; sets DEB to the .deb's path.
fetch_deb() {
    local pkg=$1 info file sha
    info=$(deb_uri "$pkg")
    if [ -z "$info" ]; then apt_update; info=$(deb_uri "$pkg"); fi
    [ -n "$info" ] || die "apt cannot find the package '$pkg' (is this Debian/Ubuntu with its main archive in sources.list?)"
    read -r _ file sha <<<"$info"
    if [ -f "$DEB_CACHE/$file" ] && printf '%s  %s\n' "$sha" "$DEB_CACHE/$file" | sha256sum -c --status; then
        say "$pkg: $file (cached in $DEB_CACHE)"
    else
        say "$pkg: downloading $file"
        if ! (cd "$DEB_CACHE" && run apt-get "${APT_OPTS[@]}" download -q "$pkg" >&2); then
            apt_update
            (cd "$DEB_CACHE" && run apt-get "${APT_OPTS[@]}" download -q "$pkg" >&2) \
                || die "apt-get download $pkg failed"
        fi
        [ -f "$DEB_CACHE/$file" ] || die "apt-get download $pkg did not produce $file"
    fi
    DEB="$DEB_CACHE/$file"
}
extract_deb() { # package, directory
    fetch_deb "$1"
    mkdir -p "$2"
    dpkg-deb -x "$DEB" "$2"
}
extract_deb bash-static "$WORK/pkg/bash-static"
extract_deb busybox-static "$WORK/pkg/busybox-static"
extract_deb tini "$WORK/pkg/tini"
extract_deb tinyproxy-bin "$WORK/pkg/tinyproxy-bin"
# etcd for the cluster tests: the host's own when Debian's package is
# installed (the loopback etcd tests run that one too), else the package.
ETCD_BINARY=${ETCD_BINARY:-}
if [ -z "$ETCD_BINARY" ]; then
    if dpkg-query -W -f '${Status}' etcd-server 2>/dev/null | grep -q 'install ok installed' \
        && [ -x /usr/bin/etcd ]; then
        ETCD_BINARY=/usr/bin/etcd
    else
        extract_deb etcd-server "$WORK/pkg/etcd-server"
        ETCD_BINARY="$WORK/pkg/etcd-server/usr/bin/etcd"
    fi
fi
[ -x "$ETCD_BINARY" ] || die "ETCD_BINARY=$ETCD_BINARY is not an executable"

# --- build contexts -------------------------------------------------------------
# Each context holds rootfs/ (copied to / as root:root) and home/ (copied to
# /var/lib as 10001:10001: it holds the image's home directory, mode 0700).
#   base CONTEXT USER_NAME HOME SHELL
base() {
    local ctx=$1 name=$2 home=$3 shell=$4
    mkdir -p "$ctx/rootfs/etc" "$ctx/rootfs/tmp" "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/var/lib" "$ctx/home"
    chmod 1777 "$ctx/rootfs/tmp"
    chmod 0755 "$ctx/rootfs" "$ctx/rootfs/etc" "$ctx/rootfs/usr" "$ctx/rootfs/usr/local" "$ctx/rootfs/usr/local/bin" \
        "$ctx/rootfs/var" "$ctx/rootfs/var/lib" "$ctx/home"
    # home/NAME is copied to /var/lib/NAME, owned by 10001 and private to it.
    case "$home" in
        /var/lib/*) mkdir -m 0700 "$ctx/home/${home#/var/lib/}" ;;
    esac
    cat >"$ctx/rootfs/etc/passwd" <<EOF
root:x:0:0:root:/root:/usr/sbin/nologin
$name:x:10001:10001:$name:$home:$shell
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
EOF
    cat >"$ctx/rootfs/etc/group" <<EOF
root:x:0:
$name:x:10001:
nogroup:x:65534:
EOF
    printf 'hosts: files dns\nnetworks: files\npasswd: files\ngroup: files\n' >"$ctx/rootfs/etc/nsswitch.conf"
    chmod 0644 "$ctx/rootfs/etc/passwd" "$ctx/rootfs/etc/group" "$ctx/rootfs/etc/nsswitch.conf"
}
# Copies binary $1 to $2, without debug sections unless --no-strip.
install_binary() {
    if [ "$STRIP" = 1 ] && command -v strip >/dev/null; then
        strip --strip-debug -o "$2" "$1"
    else
        cp "$1" "$2"
    fi
    chmod 0755 "$2"
}

# agent: tentacle, /bin/bash (bash-static), busybox with its applets, and
# tini-static as PID 1, which reaps the orphans scripts leave behind
# (`sleep 10 &`) and forwards signals to tentacle.
ctx="$WORK/agent"
base "$ctx" tentacle /var/lib/tentacle /bin/bash
install_binary "$BINARIES/tentacle" "$ctx/rootfs/usr/local/bin/tentacle"
mkdir -p "$ctx/rootfs/bin" "$ctx/rootfs/usr/bin"
install -m 0755 "$WORK/pkg/tini/usr/bin/tini-static" "$ctx/rootfs/usr/bin/tini"
install -m 0755 "$WORK/pkg/bash-static/bin/bash-static" "$ctx/rootfs/bin/bash"
install -m 0755 "$WORK/pkg/busybox-static/bin/busybox" "$ctx/rootfs/bin/busybox"
applets=0
# The applets at their usual paths (bin/sh, usr/bin/env, …), as symlinks to
# /bin/busybox; nothing already there (bash) is replaced.
while read -r applet; do
    case "$applet" in ""|linuxrc) continue ;; esac
    [ -e "$ctx/rootfs/$applet" ] || [ -L "$ctx/rootfs/$applet" ] && continue
    mkdir -p "$ctx/rootfs/$(dirname "$applet")"
    ln -s /bin/busybox "$ctx/rootfs/$applet"
    applets=$((applets + 1))
done < <("$WORK/pkg/busybox-static/bin/busybox" --list-full)
[ -L "$ctx/rootfs/bin/sh" ] || die "busybox-static provides no /bin/sh"
for bin in bin/bash bin/busybox usr/bin/tini; do
    is_static "$ctx/rootfs/$bin" || die "/$bin from Debian's package is not statically linked"
done
# shellcheck disable=SC2016 # $BASH_VERSION is for the staged bash to expand
say "agent: bash $("$ctx/rootfs/bin/bash" -c 'echo $BASH_VERSION'), busybox with $applets applets"

# hub
ctx="$WORK/hub"
base "$ctx" tentacle /var/lib/tentacle-hub /usr/sbin/nologin
install_binary "$BINARIES/tentacle-hub" "$ctx/rootfs/usr/local/bin/tentacle-hub"

# sim
ctx="$WORK/sim"
base "$ctx" tentacle /var/lib/tentacle-sim /usr/sbin/nologin
install_binary "$BINARIES/tentacle-sim" "$ctx/rootfs/usr/local/bin/tentacle-sim"

# Copies the shared libraries `ldd` lists for binary $1 (and its program
# interpreter) into rootfs $2 at their paths; prints them.
copy_libraries() {
    local binary=$1 rootfs=$2 libs lib
    libs=$(LC_ALL=C ldd "$binary" | sed -n 's/.*=> \(\/[^ ]*\) (.*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (.*/\1/p' | sort -u)
    [ -n "$libs" ] || die "ldd lists no libraries for $binary: $(ldd "$binary" 2>&1 | head -n 1)"
    if LC_ALL=C ldd "$binary" | grep -q 'not found'; then
        die "$binary needs libraries this host lacks: $(LC_ALL=C ldd "$binary" | grep 'not found' | tr -s ' \t\n' ' ')"
    fi
    for lib in $libs; do
        mkdir -p "$rootfs$(dirname "$lib")"
        cp -L "$lib" "$rootfs$lib"
    done
    echo "$libs" | tr '\n' ' '
}

# test proxy: Debian's tinyproxy, the shared libraries ldd lists, a config.
ctx="$WORK/test-proxy"
base "$ctx" tinyproxy /nonexistent /usr/sbin/nologin
tinyproxy="$WORK/pkg/tinyproxy-bin/usr/bin/tinyproxy"
mkdir -p "$ctx/rootfs/usr/bin" "$ctx/rootfs/etc/tinyproxy" "$ctx/rootfs/usr/share"
install -m 0755 "$tinyproxy" "$ctx/rootfs/usr/bin/tinyproxy"
cp -R "$WORK/pkg/tinyproxy-bin/usr/share/tinyproxy" "$ctx/rootfs/usr/share/tinyproxy"
install -m 0644 "$DOCKERFILES/tinyproxy.conf" "$ctx/rootfs/etc/tinyproxy/tinyproxy.conf"
libs=$(copy_libraries "$tinyproxy" "$ctx/rootfs")
say "test-proxy: tinyproxy with $libs"

# test etcd: Debian's etcd, a Go binary built with cgo (so dynamically
# linked: the libraries ldd lists come along), data in /var/lib/etcd.
ctx="$WORK/test-etcd"
base "$ctx" etcd /var/lib/etcd /usr/sbin/nologin
mkdir -p "$ctx/rootfs/usr/bin"
install -m 0755 "$ETCD_BINARY" "$ctx/rootfs/usr/bin/etcd"
if is_static "$ETCD_BINARY"; then
    say "test-etcd: $ETCD_BINARY (static)"
else
    libs=$(copy_libraries "$ETCD_BINARY" "$ctx/rootfs")
    say "test-etcd: $ETCD_BINARY with $libs"
fi

# --- images ---------------------------------------------------------------------
IMAGES=(agent hub sim test-proxy test-etcd)
# docker build, quiet, minus the legacy builder's deprecation notice (this
# engine has no BuildKit/buildx; the Dockerfiles need neither). The image
# this tag named before is removed when nothing else uses it, so rebuilding
# leaves no dangling images behind.
docker_build() {
    local image=$1 status=0 old new
    shift
    old=$("$DOCKER" image inspect --format '{{.Id}}' "tentacle-$image:$TAG" 2>/dev/null || true)
    printf '+ %s build --quiet --pull=false %s\n' "$DOCKER" "$*" >&2
    "$DOCKER" build --quiet --pull=false "$@" >"$WORK/$image.id" 2>"$WORK/$image.err" || status=$?
    grep -v -e '^DEPRECATED: The legacy builder' -e 'Install the buildx component' \
        -e 'https://docs.docker.com/go/buildx/' -e '^[[:space:]]*$' "$WORK/$image.err" >&2 || true
    [ "$status" = 0 ] || die "docker build of tentacle-$image failed (exit $status)"
    new=$("$DOCKER" image inspect --format '{{.Id}}' "tentacle-$image:$TAG")
    if [ -n "$old" ] && [ "$old" != "$new" ] \
        && [ "$("$DOCKER" image inspect --format '{{len .RepoTags}}' "$old" 2>/dev/null)" = 0 ]; then
        if "$DOCKER" image rm "$old" >/dev/null 2>&1; then
            say "removed the previous tentacle-$image:$TAG (${old#sha256:})"
        fi
    fi
}
for image in "${IMAGES[@]}"; do
    say "building tentacle-$image:$TAG"
    docker_build "$image" \
        --file "$DOCKERFILES/$image.Dockerfile" \
        --tag "tentacle-$image:$TAG" \
        --build-arg "VERSION=$VERSION" \
        --build-arg "SOURCE=$SOURCE" \
        --build-arg "REVISION=$REVISION" \
        "$WORK/$image"
done

say "images (sizes as \`docker images\` counts them, 1 MB = 10^6 bytes)"
for image in "${IMAGES[@]}"; do
    "$DOCKER" image inspect --format "tentacle-$image:$TAG {{.Id}} {{.Size}}" "tentacle-$image:$TAG"
done | awk '{ sub(/^sha256:/, "", $2); printf "  %-32s %s %7.1f MB\n", $1, substr($2, 1, 12), $3 / 1000000 }'
