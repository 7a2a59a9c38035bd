# ctest fixture for the consumer tests: installs the build tree into a fresh prefix.
#   cmake -D BUILD_DIR=<build tree> -D PREFIX=<install prefix> [-D CONFIG=<cfg>] -P install_prefix.cmake
foreach(var BUILD_DIR PREFIX)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "install_prefix.cmake: -D ${var}=... is required")
  endif()
endforeach()

file(REMOVE_RECURSE "${PREFIX}")  # no files left over from an earlier install
set(config_args "")
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()
execute_process(
  COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" ${config_args}
  RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "cmake --install ${BUILD_DIR} --prefix ${PREFIX} failed (${result})")
endif()
