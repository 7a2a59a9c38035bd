# ctest driver for a compile-fail test (see tests/CMakeLists.txt).
#   cmake -D BUILD_DIR=<build tree> -D TARGET=<object library> [-D CONFIG=<cfg>] -D SOURCE=<file.cpp>
#         -P expect_compile_failure.cmake
# Builds TARGET, whose only source is SOURCE. Succeeds only if the build fails and its output
# matches the regex on SOURCE's first line, `// expect: <regex>`.
foreach(var BUILD_DIR TARGET SOURCE)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "expect_compile_failure.cmake: -D ${var}=... is required")
  endif()
endforeach()

file(STRINGS "${SOURCE}" first_line LIMIT_COUNT 1)
if(NOT first_line MATCHES "^// expect: (.+)$")
  message(FATAL_ERROR "${SOURCE}: first line must be `// expect: <regex>`")
endif()
string(STRIP "${CMAKE_MATCH_1}" expected)

set(config_args "")
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()
execute_process(
  COMMAND "${CMAKE_COMMAND}" --build "${BUILD_DIR}" --target "${TARGET}" ${config_args}
  RESULT_VARIABLE result
  OUTPUT_VARIABLE output
  ERROR_VARIABLE output)

if(result EQUAL 0)
  message(FATAL_ERROR "${SOURCE} compiled, but it must not. Build output:\n${output}")
endif()
if(NOT output MATCHES "${expected}")
  message(FATAL_ERROR
    "${SOURCE} failed to compile, but no diagnostic matches `${expected}`. Build output:\n${output}")
endif()
message(STATUS "${SOURCE} failed to compile with the expected diagnostic: `${CMAKE_MATCH_0}`")
