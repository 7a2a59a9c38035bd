// Public: the umbrella header. Includes the whole public API of reactor.
#pragma once

#include "reactor/acceptor.hpp"
#include "reactor/buffer.hpp"
#include "reactor/concepts.hpp"
#include "reactor/connection.hpp"
#include "reactor/endpoint.hpp"
#include "reactor/error.hpp"
#include "reactor/fd.hpp"
#include "reactor/handle.hpp"
#include "reactor/pool.hpp"
#include "reactor/reactor.hpp"
#include "reactor/signals.hpp"
#include "reactor/socket.hpp"
#include "reactor/syscalls.hpp"
#include "reactor/timer.hpp"
#include "reactor/trigger.hpp"
#include "reactor/watcher.hpp"
