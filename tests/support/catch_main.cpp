// Test-only: Catch2 v2's main(), compiled once into reactor_catch_main (Catch2 v3 links
// Catch2::Catch2WithMain and gets the same rules from the command line; see tests/CMakeLists.txt).
// It makes two things failures that Catch2 v2 lets pass by default:
//  - a test case that checks nothing (WarnAbout::NoAssertions): every test must be able to fail;
//  - a run whose filter matches no test case (WarnAbout::NoTests): ctest runs each discovered test
//    by name, and a name that discovery mangled (e.g. one containing ';') would otherwise pass
//    without running anything.
// v2 accepts only one --warn on the command line, hence this main instead of CATCH_CONFIG_MAIN.
#define CATCH_CONFIG_RUNNER
#include "catch.hpp"

int main(int argc, char* argv[]) {
  Catch::Session session;
  if (const int rc = session.applyCommandLine(argc, argv); rc != 0) {
    return rc;
  }
  auto& config = session.configData();
  config.warnings = static_cast<Catch::WarnAbout::What>(
      config.warnings | Catch::WarnAbout::NoAssertions | Catch::WarnAbout::NoTests);
  return session.run();
}
