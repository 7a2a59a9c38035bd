# ctest driver for a consumer test: configures, builds and runs one of tests/cmake_*/ from scratch,
# as a user of reactor would.
#   cmake -D SOURCE_DIR=<consumer project> -D BINARY_DIR=<its build dir> -D REACTOR_SOURCE_DIR=<repo>
#         -D GENERATOR=<gen> [-D GENERATOR_PLATFORM=] [-D GENERATOR_TOOLSET=] [-D MAKE_PROGRAM=]
#         -D CXX_COMPILER=<c++> [-D CXX_FLAGS=] [-D CONFIG=<cfg>] [-D PREFIX_PATH=<install prefix>]
#         [-D TLS=ON] [-D HIDE_OPENSSL=ON]
#         [-D PKG_CONFIG_EXECUTABLE=<pkg-config> -D PKG_CONFIG_DIR=<dir of reactor.pc>
#          -D INCLUDE_DIR=<installed include dir>]
#         -P run_consumer.cmake
# The consumer project builds an executable named `consumer` from main.cpp, which must exit 0.
# TLS=ON (reactor::tls is built): the project is configured with -DREACTOR_CONSUMER_TLS=ON and must
# also build `consumer_tls` from tls_main.cpp, linked with reactor::tls; it must exit 0 too.
# HIDE_OPENSSL=ON: the project is configured with -DCMAKE_DISABLE_FIND_PACKAGE_OpenSSL=ON, as on a
# machine without OpenSSL (the project checks that reactor::reactor still works there).
# With PKG_CONFIG_EXECUTABLE, main.cpp is also compiled with only `pkg-config --cflags --libs reactor`
# (plus -std=c++20) and run, which proves the installed reactor.pc is usable and relocatable, and
# that it names no OpenSSL; with TLS=ON, tls_main.cpp likewise with `pkg-config reactor-tls`.
foreach(var SOURCE_DIR BINARY_DIR REACTOR_SOURCE_DIR GENERATOR CXX_COMPILER)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer.cmake: -D ${var}=... is required")
  endif()
endforeach()

function(run_step what)
  execute_process(COMMAND ${ARGN}
    RESULT_VARIABLE result
    OUTPUT_VARIABLE output
    ERROR_VARIABLE output)
  if(NOT result EQUAL 0)
    string(REPLACE ";" " " command "${ARGN}")
    message(FATAL_ERROR "${what} failed (${result}):\n  ${command}\n${output}")
  endif()
  message(STATUS "${what}: ok")
  set(step_output "${output}" PARENT_SCOPE)
endfunction()

# Start from nothing each time: the point is a first-time user's configure.
file(REMOVE_RECURSE "${BINARY_DIR}")

set(configure -S "${SOURCE_DIR}" -B "${BINARY_DIR}" -G "${GENERATOR}"
  "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}"
  "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}"
  "-DREACTOR_SOURCE_DIR=${REACTOR_SOURCE_DIR}")
if(GENERATOR_PLATFORM)
  list(APPEND configure -A "${GENERATOR_PLATFORM}")
endif()
if(GENERATOR_TOOLSET)
  list(APPEND configure -T "${GENERATOR_TOOLSET}")
endif()
if(MAKE_PROGRAM)
  list(APPEND configure "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(CONFIG)
  list(APPEND configure "-DCMAKE_BUILD_TYPE=${CONFIG}")
endif()
if(PREFIX_PATH)
  list(APPEND configure "-DCMAKE_PREFIX_PATH=${PREFIX_PATH}")
endif()
if(HIDE_OPENSSL)
  list(APPEND configure "-DCMAKE_DISABLE_FIND_PACKAGE_OpenSSL=ON")
  set(TLS OFF)
endif()
if(TLS)
  list(APPEND configure "-DREACTOR_CONSUMER_TLS=ON")
endif()
set(config_args "")
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()

run_step("configure ${SOURCE_DIR}" "${CMAKE_COMMAND}" ${configure})
run_step("build" "${CMAKE_COMMAND}" --build "${BINARY_DIR}" ${config_args})

# Single-config generators put the executable in BINARY_DIR, multi-config ones in BINARY_DIR/<cfg>.
function(run_built name)
  foreach(candidate "${BINARY_DIR}/${name}" "${BINARY_DIR}/${CONFIG}/${name}")
    if(EXISTS "${candidate}" AND NOT IS_DIRECTORY "${candidate}")
      run_step("run ${name}" "${candidate}")
      return()
    endif()
  endforeach()
  message(FATAL_ERROR "build of ${SOURCE_DIR} produced no `${name}` executable")
endfunction()
run_built(consumer)
if(TLS)
  run_built(consumer_tls)
endif()

if(NOT PKG_CONFIG_EXECUTABLE)
  return()
endif()

# pkg-config: the flags must point into the install prefix, wherever that was moved to.
set(ENV{PKG_CONFIG_PATH} "${PKG_CONFIG_DIR}")
file(REAL_PATH "${INCLUDE_DIR}" expected_include)
separate_arguments(cxx_flags UNIX_COMMAND "${CXX_FLAGS}")

# pkg_config_consumer(<module> <source> <executable>): compiles <source> with only the module's
# flags (plus -std=c++20) and runs it. Sets pc_libs (the module's --libs) in the caller.
function(pkg_config_consumer module source executable)
  run_step("pkg-config --cflags ${module}" "${PKG_CONFIG_EXECUTABLE}" --cflags ${module})
  separate_arguments(pc_cflags UNIX_COMMAND "${step_output}")
  run_step("pkg-config --libs ${module}" "${PKG_CONFIG_EXECUTABLE}" --libs ${module})
  separate_arguments(pc_libs UNIX_COMMAND "${step_output}")

  set(include_found FALSE)
  foreach(flag IN LISTS pc_cflags)
    if(flag MATCHES "^-I(.+)$")
      set(include "${CMAKE_MATCH_1}")
      if(EXISTS "${include}")
        file(REAL_PATH "${include}" include)
        if(include STREQUAL expected_include)
          set(include_found TRUE)
        endif()
      endif()
    endif()
  endforeach()
  if(NOT include_found)
    message(FATAL_ERROR "pkg-config --cflags ${module} gave `${pc_cflags}`, no -I for ${expected_include}")
  endif()

  run_step("compile ${source} with pkg-config ${module}"
    "${CXX_COMPILER}" ${cxx_flags} -std=c++20 ${pc_cflags} "${SOURCE_DIR}/${source}"
    -o "${BINARY_DIR}/${executable}" ${pc_libs})
  run_step("run ${executable}" "${BINARY_DIR}/${executable}")
  set(pc_libs "${pc_libs}" PARENT_SCOPE)
endfunction()

pkg_config_consumer(reactor main.cpp consumer_pkg_config)
if(pc_libs MATCHES "-l(ssl|crypto)")
  message(FATAL_ERROR "pkg-config --libs reactor gave `${pc_libs}`: reactor.pc must not need OpenSSL")
endif()
if(TLS)
  pkg_config_consumer(reactor-tls tls_main.cpp consumer_tls_pkg_config)
  if(NOT pc_libs MATCHES "-lssl")
    message(FATAL_ERROR "pkg-config --libs reactor-tls gave `${pc_libs}`, without -lssl")
  endif()
endif()
