# Included by the add_subdirectory and FetchContent consumer tests after reactor was added as a
# subproject: reactor must not build its own tests, examples or benches there, must not generate
# install rules, must not hand its warning flags (-Werror) to the consumer, and must keep OpenSSL
# out of reactor::reactor.
foreach(option REACTOR_BUILD_TESTS REACTOR_BUILD_EXAMPLES REACTOR_BUILD_BENCH REACTOR_INSTALL)
  if(${option})
    message(FATAL_ERROR "${option} defaults to ON although reactor is not the top-level project")
  endif()
endforeach()
foreach(target reactor_catch_main reactor_header_check reactor_tls_header_check echo_server)
  if(TARGET ${target})
    message(FATAL_ERROR "reactor defined ${target} although it is not the top-level project")
  endif()
endforeach()
if(NOT TARGET reactor::reactor)
  message(FATAL_ERROR "reactor::reactor is not defined")
endif()
# Neither reactor::reactor nor reactor::tls (if built) passes warning flags on; reactor::reactor
# needs no OpenSSL.
foreach(target reactor::reactor reactor::tls)
  if(NOT TARGET ${target})
    continue()
  endif()
  get_target_property(reactor_compile_options ${target} INTERFACE_COMPILE_OPTIONS)
  get_target_property(reactor_link_libraries ${target} INTERFACE_LINK_LIBRARIES)
  if(reactor_compile_options OR reactor_link_libraries MATCHES "reactor_warnings")
    message(FATAL_ERROR "${target} passes warning flags to its consumers: "
      "options `${reactor_compile_options}`, libraries `${reactor_link_libraries}`")
  endif()
endforeach()
get_target_property(reactor_link_libraries reactor::reactor INTERFACE_LINK_LIBRARIES)
if(reactor_link_libraries MATCHES "OpenSSL")
  message(FATAL_ERROR "reactor::reactor links `${reactor_link_libraries}`: it must not need OpenSSL")
endif()
