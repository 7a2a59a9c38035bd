// Test-only shim (not part of reactor): includes Catch2's test API for whichever major version the
// build found. REACTOR_CATCH2_MAJOR comes from tests/CMakeLists.txt; __has_include is the fallback
// for tools (clangd, clang-tidy) that read a file without it.
#pragma once

#if defined(REACTOR_CATCH2_MAJOR) && REACTOR_CATCH2_MAJOR >= 3
#include <catch2/catch_all.hpp>
#elif defined(REACTOR_CATCH2_MAJOR)
#include <catch2/catch.hpp>
#elif __has_include(<catch2/catch_all.hpp>)
#include <catch2/catch_all.hpp>
#elif __has_include(<catch2/catch.hpp>)
#include <catch2/catch.hpp>
#else
#error "Catch2 not found (Debian: apt-get install catch2)"
#endif
