// Consumer test: see tests/cmake_fetch_content/CMakeLists.txt.
#include <chrono>
#include <reactor.hpp>

int main() {
  reactor::Reactor<> loop;
  loop.run_once(std::chrono::milliseconds(0));
  return 0;
}
