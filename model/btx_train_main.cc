// btx-train: runs one training-pipeline job in its own process (docs/btx-train-protocol.md).
#include <fcntl.h>
#include <signal.h>

#include <atomic>
#include <cstring>
#include <iostream>
#include <string>

#include "btx/model/distributed.h"
#include "btx/model/job.h"

namespace {
std::atomic<bool> g_stop{false};
void OnTerm(int) { g_stop.store(true); }
}  // namespace

int main(int argc, char** argv) {
  std::string job;
  int fd = -2;  // -2: protocol default (3 when open)
  int store_port = -1;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--job" && i + 1 < argc) job = argv[++i];
    else if (a == "--store-server" && i + 1 < argc) store_port = std::atoi(argv[++i]);
    else if (a == "--progress-fd" && i + 1 < argc) fd = std::atoi(argv[++i]);
    else if (a == "--help" || a == "-h") {
      std::cout << "usage: btx-train --job JOB.json [--progress-fd N]\n"
                   "       btx-train --store-server PORT   (a multi-rank job's rendezvous store; 0: any free port,\n"
                   "                                        printed as 'port N'; serves until SIGTERM)\n";
      return 0;
    } else {
      std::cerr << "btx-train: invalid job: unknown argument '" << a << "'\n";
      return btx::model::kExitInvalidJob;
    }
  }
  struct sigaction sa {};
  sa.sa_handler = OnTerm;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGTERM, &sa, nullptr);
  ::sigaction(SIGINT, &sa, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
  if (store_port >= 0) {
    btx::Status st = btx::model::ServeStore(
        store_port, [](int port) { std::cout << "port " << port << std::endl; }, [] { return g_stop.load(); });
    if (!st.ok()) std::cerr << "btx-train: " << st.message() << "\n";
    return st.ok() ? 0 : btx::model::kExitFailed;
  }
  if (job.empty()) {
    std::cerr << "btx-train: invalid job: --job JOB.json is required\n";
    return btx::model::kExitInvalidJob;
  }
  if (fd == -2) fd = ::fcntl(3, F_GETFD) != -1 ? 3 : -1;
  return btx::model::RunJobFile(job, fd, &g_stop);
}
