# Sourced by scripts/build-image and scripts/release.
# collect_runtime_libs BIN_DIR DEST STRIP(true|false): copies into DEST the shared libraries that
# fpga-agent and fpgactl in BIN_DIR load from outside the system's library directories: what ldd
# resolves elsewhere (through RUNPATH, e.g. a toolchain's usr/lib/swift/linux for a debug build),
# and what it cannot find, looked up in the RUNPATH ($ORIGIN is BIN_DIR). Prints how many.
# A release build (--static-swift-stdlib) needs none: only the system's libc, libstdc++,
# libsqlite3 and zlib, which the base image has.
collect_runtime_libs() {
  local bin_dir="$1" dest="$2" strip="$3" count=0 b runpath name arrow path d
  local -a dirs
  mkdir -p "$dest"
  for b in fpga-agent fpgactl; do
    runpath=$(readelf -d "$bin_dir/$b" | sed -n 's/.*(\(RUN\|R\)PATH).*\[\(.*\)\]/\2/p' | head -1)
    runpath=${runpath//\$ORIGIN/$bin_dir}
    while read -r name arrow path _; do
      [ "$arrow" = "=>" ] || continue
      if [ "$path" = not ]; then
        path=""
        IFS=: read -ra dirs <<<"$runpath"
        for d in "${dirs[@]}"; do if [ -f "$d/$name" ]; then path="$d/$name"; break; fi; done
        [ -n "$path" ] || { echo "$b needs $name, found nowhere (RUNPATH $runpath)" >&2; return 1; }
      fi
      [[ "$path" =~ ^/(usr/)?lib(64|32)?/([^/]+-linux-gnu[^/]*/)?[^/]+$ ]] && continue
      if [ ! -f "$dest/$name" ]; then
        cp -L "$path" "$dest/$name"
        if [ "$strip" = true ]; then strip --strip-unneeded "$dest/$name" 2>/dev/null || true; fi
        count=$((count + 1))
      fi
    done < <(ldd "$bin_dir/$b")
  done
  echo "$count"
}
