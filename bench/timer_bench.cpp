// Microbenchmarks (Google Benchmark) for timer.hpp and Reactor::post(): scheduling and cancelling
// a timer among many (the idle-timeout pattern), firing due timers, the Task that stores a
// callback, and posting work to the loop from its own thread and from another.
#include <benchmark/benchmark.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <reactor.hpp>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

// Schedule one timer and cancel it again, with `range(0)` other timers pending (the heap's depth).
void BM_TimerQueue_AddCancel(benchmark::State& state) {
  reactor::detail::TimerQueue timers;
  const auto base = Clock::now() + std::chrono::hours(1);
  for (std::int64_t i = 0; i < state.range(0); ++i) {
    timers.add(base + std::chrono::milliseconds(i), {}, [] {});
  }
  for (auto _ : state) {
    const reactor::TimerId id = timers.add(base + std::chrono::minutes(1), {}, [] {});
    benchmark::DoNotOptimize(timers.cancel(id));
  }
}
BENCHMARK(BM_TimerQueue_AddCancel)->Arg(0)->Arg(10'000);

// Fire one due timer out of `range(0)` pending ones, rescheduled (as a connection's timeout check).
void BM_TimerQueue_FireOne(benchmark::State& state) {
  reactor::detail::TimerQueue timers;
  const auto base = Clock::now() + std::chrono::hours(1);
  for (std::int64_t i = 0; i < state.range(0); ++i) {
    timers.add(base + std::chrono::milliseconds(i), {}, [] {});
  }
  std::uint64_t fired = 0;
  const auto now = Clock::now();
  for (auto _ : state) {
    timers.add(now, {}, [&fired] { ++fired; });
    timers.run_due(now);
  }
  benchmark::DoNotOptimize(fired);
}
BENCHMARK(BM_TimerQueue_FireOne)->Arg(0)->Arg(10'000);

// Through the reactor: schedule_after + cancel (arms the timerfd only when the earliest moves).
void BM_Reactor_ScheduleCancel(benchmark::State& state) {
  reactor::Reactor<> loop;
  loop.schedule_after(std::chrono::hours(1), [] {});  // the timerfd exists and is armed
  for (auto _ : state) {
    const reactor::TimerId id = loop.schedule_after(std::chrono::hours(2), [] {});
    benchmark::DoNotOptimize(loop.cancel(id));
  }
}
BENCHMARK(BM_Reactor_ScheduleCancel);

void BM_Task_ConstructInvoke(benchmark::State& state) {
  std::uint64_t counter = 0;
  for (auto _ : state) {
    reactor::detail::Task task([&counter] { ++counter; });
    task();
  }
  benchmark::DoNotOptimize(counter);
}
BENCHMARK(BM_Task_ConstructInvoke);

// post() from the loop thread, then one run_once that runs it: an eventfd write, epoll_wait and
// an eventfd read per batch of `range(0)` tasks.
void BM_Reactor_PostSameThread(benchmark::State& state) {
  reactor::Reactor<> loop;
  std::uint64_t ran = 0;
  const auto batch = state.range(0);
  for (auto _ : state) {
    for (std::int64_t i = 0; i < batch; ++i) loop.post([&ran] { ++ran; });
    loop.run_once(std::chrono::milliseconds(0));
  }
  state.SetItemsProcessed(state.iterations() * batch);
  benchmark::DoNotOptimize(ran);
}
BENCHMARK(BM_Reactor_PostSameThread)->Arg(1)->Arg(64);

// post() from another thread while the loop runs: the cost seen by the posting thread.
void BM_Reactor_PostCrossThread(benchmark::State& state) {
  reactor::Reactor<> loop;
  std::atomic<std::uint64_t> ran{0};
  std::thread runner([&] { loop.run(); });
  for (auto _ : state) loop.post([&ran] { ran.fetch_add(1, std::memory_order_relaxed); });
  loop.stop();
  runner.join();
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Reactor_PostCrossThread)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
