// Test-only: a main() for the fuzz targets without libFuzzer. It runs LLVMFuzzerTestOneInput once
// per file named on the command line (a directory means each file in it, sorted), or on the
// target's seed corpus (FUZZ_CORPUS_DIR) when given nothing, and exits 0 if none of them crashed.
// This is how every build (GCC, ASan, valgrind) replays the corpora as ctest tests.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

int main(int argc, char** argv) {
  std::vector<std::filesystem::path> inputs;
  std::vector<std::filesystem::path> arguments(argv + 1, argv + argc);
#ifdef FUZZ_CORPUS_DIR
  if (arguments.empty()) arguments.emplace_back(FUZZ_CORPUS_DIR);
#endif
  for (const auto& argument : arguments) {
    if (std::filesystem::is_directory(argument)) {
      std::vector<std::filesystem::path> files;
      for (const auto& entry : std::filesystem::directory_iterator(argument)) {
        if (entry.is_regular_file()) files.push_back(entry.path());
      }
      std::sort(files.begin(), files.end());
      inputs.insert(inputs.end(), files.begin(), files.end());
    } else {
      inputs.push_back(argument);
    }
  }
  if (inputs.empty()) {
    std::fprintf(stderr, "replay: no inputs\n");
    return 1;
  }
  for (const auto& path : inputs) {
    std::ifstream file(path, std::ios::binary);
    if (!file) {
      std::fprintf(stderr, "replay: cannot read %s\n", path.c_str());
      return 1;
    }
    const std::string bytes{std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
    LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
  }
  std::printf("replay: %zu inputs ran\n", inputs.size());
  return 0;
}
