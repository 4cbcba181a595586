# Build the compiled broadcast tool (csrc/) into build/aegis-stage for the stage tests;
# cmake only rebuilds what changed, so this is quick when nothing did.
if command -v cmake >/dev/null && command -v mpicc >/dev/null; then
    if [ ! -f build/CMakeCache.txt ]; then
        log "configuring build/ for aegis-stage"
        cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
    fi
    cmake --build build -j 2 >/dev/null || { log "building aegis-stage failed"; return 1; }
else
    log "cmake or mpicc missing: the native stage tests will fail"
fi
