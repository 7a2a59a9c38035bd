// Test-only: sim_scenarios, the scenario fuzzer (sim_fuzzer.cpp) driven by a seeded generator
// instead of libFuzzer: each seed expands (std::mt19937_64) into one input of 2-8 KiB. This is the
// fixed-seed run ctest does (label `simulation`), and how a seed is replayed:
//   sim_scenarios --seeds FIRST COUNT    runs seeds FIRST..FIRST+COUNT-1; a failure names its seed
//   sim_scenarios --seed N [--trace]     runs one (--trace: every simulated call on stderr)
//   sim_scenarios --write N FILE         writes seed N's input to FILE (to keep it in a corpus)
// Every 50th seed runs twice and must leave the same trace hash: the simulation is deterministic.
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define SIM_SCENARIOS_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SIM_SCENARIOS_ASAN 1
#endif
#endif
#ifdef SIM_SCENARIOS_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);
extern std::uint64_t sim_fuzzer_last_hash;

namespace {

std::vector<std::uint8_t> input_for(std::uint64_t seed) {
  std::mt19937_64 generator(seed * 0x9E3779B97F4A7C15ULL + 1);
  std::vector<std::uint8_t> input(2048 + generator() % 6144);
  for (auto& byte : input) byte = static_cast<std::uint8_t>(generator());
  return input;
}

std::uint64_t run(std::uint64_t seed) {
  const std::vector<std::uint8_t> input = input_for(seed);
  LLVMFuzzerTestOneInput(input.data(), input.size());
  return sim_fuzzer_last_hash;
}

char seed_text[64];

// A failed invariant aborts: say which seed it was.
void on_abort(int) {
  const ssize_t ignored = ::write(2, seed_text, std::strlen(seed_text));
  (void)ignored;
}

// So does a sanitizer's report (a use after free, say), which ends the process without the
// SIGABRT handler: a mutant caught by ASan names its seed too (tests/simulation/find_mutants).
[[maybe_unused]] void on_sanitizer_death() {
  on_abort(0);
}

void announce(std::uint64_t seed) {
  std::snprintf(seed_text, sizeof seed_text, "sim_scenarios: failed at seed %llu\n",
                static_cast<unsigned long long>(seed));
}

int usage() {
  std::fprintf(stderr,
               "usage: sim_scenarios --seeds FIRST COUNT | --seed N [--trace] | --write N FILE\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::signal(SIGABRT, on_abort);
#ifdef SIM_SCENARIOS_ASAN
  __sanitizer_set_death_callback(on_sanitizer_death);
#endif
  // --trace may come anywhere: take it out of the arguments.
  std::vector<char*> args(argv, argv + argc);
  const auto trace = std::find_if(args.begin() + 1, args.end(),
                                  [](const char* a) { return std::strcmp(a, "--trace") == 0; });
  if (trace != args.end()) {
    ::setenv("REACTOR_SIM_TRACE", "1", 1);
    args.erase(trace);
  }
  argc = static_cast<int>(args.size());
  argv = args.data();
  if (argc >= 4 && std::strcmp(argv[1], "--seeds") == 0) {
    const std::uint64_t first = std::strtoull(argv[2], nullptr, 10);
    const std::uint64_t count = std::strtoull(argv[3], nullptr, 10);
    for (std::uint64_t seed = first; seed < first + count; ++seed) {
      announce(seed);
      const std::uint64_t hash = run(seed);
      if (seed % 50 == 0 && run(seed) != hash) {
        std::fprintf(stderr, "sim_scenarios: seed %llu ran differently twice\n",
                     static_cast<unsigned long long>(seed));
        return 1;
      }
    }
    std::printf("sim_scenarios: %llu scenarios from seed %llu passed\n",
                static_cast<unsigned long long>(count), static_cast<unsigned long long>(first));
    return 0;
  }
  if (argc >= 3 && std::strcmp(argv[1], "--seed") == 0) {
    const std::uint64_t seed = std::strtoull(argv[2], nullptr, 10);
    announce(seed);
    std::printf("sim_scenarios: seed %llu passed, trace hash %016llx\n",
                static_cast<unsigned long long>(seed), static_cast<unsigned long long>(run(seed)));
    return 0;
  }
  if (argc >= 4 && std::strcmp(argv[1], "--write") == 0) {
    const std::vector<std::uint8_t> input = input_for(std::strtoull(argv[2], nullptr, 10));
    std::ofstream(argv[3], std::ios::binary)
        .write(reinterpret_cast<const char*>(input.data()),
               static_cast<std::streamsize>(input.size()));
    return 0;
  }
  return usage();
}
