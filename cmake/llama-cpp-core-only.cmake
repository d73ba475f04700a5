# Run by CMake right after llama.cpp's `project()` while pip builds llama-cpp-python (the
# Makefile passes CMAKE_ARGS=-DCMAKE_PROJECT_llama.cpp_INCLUDE=<this file>). llama-cpp-python
# forces LLAMA_BUILD_COMMON on, so -DLLAMA_BUILD_COMMON=OFF alone does nothing; yet its Python
# bindings load only libllama and libggml*: llama.cpp's `common` library (argument parsing,
# chat parsers, HTTP client) is never loaded, and compiling it is about a third of the build.
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama: build common utils library" FORCE)
