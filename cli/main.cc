// btxctl: the composition root. Parses flags, resolves where to connect (--server, BTX_SERVER, the
// config file, or the embedded stack), builds the client and hands over to one command.
#include <unistd.h>

#include <csignal>

#include <filesystem>
#include <memory>
#include <optional>

#include <CLI/CLI.hpp>

#include "client.h"
#include "commands.h"
#include "config.h"
#include "embedded.h"
#include "exit_codes.h"
#include "signals.h"
#include "terminal.h"

#ifndef BTX_VERSION
#define BTX_VERSION "0.0.0"
#endif

namespace {
using namespace btx::cli;

void PrintError(const absl::Status& s) {
  std::fprintf(stderr, "btxctl: %s\n", std::string(s.message()).c_str());
  for (const auto& v : ViolationsOf(s)) std::fprintf(stderr, "%s: %s\n", v.field.c_str(), v.description.c_str());
}

int Main(int argc, char** argv) {
  CLI::App app{"btxctl: submit, follow and inspect Branch-Train-MiX pipelines.\n"
               "Without --server (or BTX_SERVER), btxctl runs everything itself: a private PostgreSQL under the state dir,\n"
               "the scheduler on loopback and, for `run`, local workers.",
               "btxctl"};
  app.fallthrough();
  app.set_version_flag("--version", std::string("btxctl ") + BTX_VERSION);

  std::string server, token, state_dir, output = "table";
  std::string tls_ca, tls_cert, tls_key, tls_server_name;
  int timeout_s = 30;
  auto* server_opt = app.add_option("--server", server, "scheduler HOST:PORT (env BTX_SERVER; 'local' = embedded)");
  std::string token_file;
  // Kept, hidden, only to refuse it with the reason (a token on argv is visible to every user).
  auto* token_opt = app.add_option("--token", token)->group("");
  auto* token_file_opt =
      app.add_option("--token-file", token_file, "file holding the bearer token for the scheduler (or env BTX_TOKEN)");
  auto* tls_ca_opt =
      app.add_option("--tls-ca", tls_ca, "connect with TLS, trusting these PEM roots (env BTX_TLS_CA; config tls_ca)");
  auto* tls_cert_opt =
      app.add_option("--tls-cert", tls_cert, "PEM client certificate for mutual TLS (env BTX_TLS_CERT; config tls_cert)");
  auto* tls_key_opt = app.add_option("--tls-key", tls_key, "PEM private key of --tls-cert (env BTX_TLS_KEY; config tls_key)");
  auto* tls_name_opt = app.add_option("--tls-server-name", tls_server_name,
                                      "name to expect in the scheduler's certificate (env BTX_TLS_SERVER_NAME)");
  auto* state_opt = app.add_option("--state-dir", state_dir, "embedded state directory (env BTX_STATE_DIR; default ./.btx)");
  app.add_option("-o,--output", output, "output format: table, json or yaml")
      ->check(CLI::IsMember({"table", "json", "yaml"}))
      ->capture_default_str();
  app.add_option("--timeout", timeout_s, "seconds to wait for each unary call")->check(CLI::Range(1, 3600))->capture_default_str();

  SubmitArgs submit_args;
  EmbeddedConfig embedded;
  auto* run = app.add_subcommand("run", "submit a pipeline and follow it to the end (the embedded default without --server)");
  run->add_option("file", submit_args.file, "pipeline spec (YAML or JSON; - for stdin)")->required();
  run->add_option("--idempotency-key", submit_args.idempotency_key, "a repeat with the same key follows the same pipeline");
  run->add_flag("--fresh", submit_args.fresh,
                "embedded: start a new pipeline even if an unfinished one of the same spec is in the state dir "
                "(by default a repeated run re-attaches to it)");
  run->add_option("--threads", embedded.threads_per_job, "embedded: CPU threads per job (0 = hardware threads / slots)")
      ->check(CLI::Range(0, 1024));
  run->add_option("--slots", embedded.slots, "embedded: jobs at once per local worker (0 = one per GPU, or 1)")
      ->check(CLI::Range(0, 64));
  int local_workers = 0;
  run->add_option("--local-workers", local_workers,
                  "embedded: local workers to start, each with its own share of the GPUs and CPU threads "
                  "(0 = the spec's resources.nodes_per_job, or 1)")
      ->check(CLI::Range(0, 64));
  run->add_option("--train-binary", embedded.train_binary, "embedded: btx-train executable (env BTX_TRAIN_BINARY)")
      ->envname("BTX_TRAIN_BINARY");

  auto* submit = app.add_subcommand("submit", "validate and submit a pipeline without following it");
  submit->add_option("file", submit_args.file, "pipeline spec (YAML or JSON; - for stdin)")->required();
  submit->add_option("--idempotency-key", submit_args.idempotency_key, "a repeat with the same key returns the same pipeline");
  submit->add_flag("--dry-run", submit_args.dry_run, "validate and plan only; store nothing");

  GetArgs get_args;
  auto* get = app.add_subcommand("get", "list pipelines, jobs or workers (or show one)");
  get->add_option("what", get_args.what, "pipelines | jobs | workers")
      ->required()
      ->check(CLI::IsMember({"pipelines", "pipeline", "jobs", "job", "workers", "worker"}));
  get->add_option("id", get_args.id, "one id (or unique id prefix, or name)");
  get->add_option("--pipeline", get_args.pipeline, "jobs: only this pipeline's");
  get->add_option("--state", get_args.state, "only this state (e.g. running, failed)");
  get->add_option("--name", get_args.name_prefix, "pipelines: only names starting with this");
  get->add_option("--limit", get_args.limit, "at most this many")->check(CLI::Range(1, 1000));

  std::string describe_what, ref;
  int max_events = 25;
  auto* describe = app.add_subcommand("describe", "everything about a pipeline: jobs, attempts, metrics, evaluation, events");
  describe->add_option("what", describe_what, "pipeline")->required()->check(CLI::IsMember({"pipeline", "pipelines"}));
  describe->add_option("id", ref, "pipeline id, unique id prefix, or name")->required();
  describe->add_option("--events", max_events, "show this many of the latest events")->capture_default_str();

  int64_t after = 0;
  auto* watch = app.add_subcommand("watch", "follow a pipeline live until it ends");
  watch->add_option("id", ref, "pipeline id, unique id prefix, or name")->required();
  watch->add_option("--after", after, "resume after this event id");

  bool follow = false;
  std::string logs_pipeline;
  auto* logs = app.add_subcommand("logs", "print a job's log (stdout/stderr of btx-train and worker notes)");
  logs->add_option("job", ref, "job id, unique id prefix, or job name (the newest, or within --pipeline)")->required();
  logs->add_flag("-f,--follow", follow, "keep streaming until the job ends");
  logs->add_option("--pipeline", logs_pipeline, "look the job name up in this pipeline");
  logs->add_option("--after", after, "resume after this log sequence number");

  std::string reason;
  auto* cancel = app.add_subcommand("cancel", "cancel a pipeline (running jobs stop at their next heartbeat)");
  cancel->add_option("id", ref, "pipeline id, unique id prefix, or name")->required();
  cancel->add_option("--reason", reason, "recorded with the cancellation");

  auto* retry = app.add_subcommand("retry", "requeue the failed and cancelled jobs of a pipeline");
  retry->add_option("id", ref, "pipeline id, unique id prefix, or name")->required();

  DataPrepareArgs data_args;
  auto* data = app.add_subcommand("data", "prepare training data ahead of time");
  auto* prepare = data->add_subcommand(
      "prepare", "tokenize text, JSONL or chat files into train/valid token shards (*.btxtok) under --out");
  prepare->add_option("inputs", data_args.inputs,
                      "text, JSONL or chat JSONL files, or directories (walked recursively)")->required();
  prepare->add_option("--format", data_args.format,
                      "text | jsonl | chat (default: from each file's extension; *.jsonl with \"messages\" is chat)");
  prepare->add_option("--text-field", data_args.text_field, "jsonl: the field holding each record's text (default text)");
  prepare->add_option("--out", data_args.out, "output directory (must not exist; published atomically)")->required();
  prepare->add_option("--tokenizer", data_args.tokenizer,
                      "byte (default), PATH.model, a model DIR (its tokenizer and chat template), or spm:VOCAB to train one");
  prepare->add_option("--valid-fraction", data_args.valid_fraction, "share of input bytes for valid/ (default 0.01)");
  prepare->add_option("--shard-tokens", data_args.shard_tokens, "tokens per shard (default 16777216)");
  prepare->add_option("--seed", data_args.seed, "seed of the document order (default 0)");
  data->require_subcommand(1);

  auto* version = app.add_subcommand("version", "print the version");
  app.require_subcommand(1);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    std::fprintf(stderr, "btxctl: %s (see btxctl --help)\n", e.what());
    return kExitUsage;
  }
  if (version->parsed()) {
    std::printf("btxctl %s (API btx.v1)\n", BTX_VERSION);
    return kExitOk;
  }
  if (prepare->parsed()) {
    // Local work only: no scheduler, so no connection to resolve and no embedded stack to start.
    CommandEnv cmd;
    auto result = DataPrepare(cmd, data_args);
    if (!result.ok()) {
      PrintError(result.status());
      return ExitCodeFor(result.status());
    }
    return *result;
  }

  const EnvLookup env = ProcessEnv();
  const std::string config_path = ConfigFilePath(env);
  auto file = LoadConfigFile(config_path);
  if (!file.ok()) {
    PrintError(file.status());
    return kExitUsage;
  }
  Flags flags;
  if (server_opt->count() > 0) flags.server = server;
  flags.token_on_argv = token_opt->count() > 0;
  if (token_file_opt->count() > 0) flags.token_file = token_file;
  if (state_opt->count() > 0) flags.state_dir = state_dir;
  if (tls_ca_opt->count() > 0) flags.tls_ca = tls_ca;
  if (tls_cert_opt->count() > 0) flags.tls_cert = tls_cert;
  if (tls_key_opt->count() > 0) flags.tls_key = tls_key;
  if (tls_name_opt->count() > 0) flags.tls_server_name = tls_server_name;
  auto conn = ResolveConnection(flags, env, *file, config_path);
  if (!conn.ok()) {
    PrintError(conn.status());
    return kExitUsage;
  }
  auto format = ParseFormat(output);
  if (!format.ok()) {
    PrintError(format.status());
    return kExitUsage;
  }

  PathContext paths;
  {
    std::error_code ec;
    paths.cwd = std::filesystem::current_path(ec).string();
    if (auto home = env("HOME")) paths.home = *home;
  }

  std::unique_ptr<EmbeddedStack> stack;
  std::optional<RewrittenSpec> run_spec;
  ClientConfig cc;
  cc.token = conn->token;
  cc.timeout = std::chrono::seconds(timeout_s);
  if (conn->embedded()) {
    if (submit->parsed() && !submit_args.dry_run) {
      PrintError(absl::InvalidArgumentError(
          "submit without --server would queue a pipeline that no worker runs; run it here with `btxctl run FILE`, "
          "or pass --server HOST:PORT (or set BTX_SERVER)"));
      return kExitUsage;
    }
    embedded.state_dir = conn->state_dir;
    embedded.workers = run->parsed();
    if (run->parsed()) {
      // Read once, here: a gang spec (resources.nodes_per_job K) needs K local workers to form its gangs.
      auto loaded = LoadSpec(submit_args.file, paths);
      if (!loaded.ok()) {
        PrintError(loaded.status());
        return ExitCodeFor(loaded.status());
      }
      run_spec = std::move(*loaded);
      submit_args.loaded = &*run_spec;
      embedded.local_workers = local_workers > 0 ? local_workers : SpecNodesPerJob(*run_spec);
    }
    embedded.require_existing = !run->parsed() && !submit->parsed();
    auto started = EmbeddedStack::Start(embedded);
    if (!started.ok()) {
      PrintError(started.status());
      return kExitUnreachable;
    }
    stack = std::move(*started);
    cc.target = stack->target();
    cc.display_target = "the embedded scheduler (state in " + stack->state_dir() + ")";
    cc.tls_hints = false;
  } else {
    cc.target = conn->server;
    cc.display_target = conn->server;
    cc.tls = conn->tls;
    if (!cc.tls.enabled() && !cc.token.empty() && !btx::tls::IsLocalAddress(cc.target)) {
      std::fprintf(stderr, "btxctl: warning: sending the token to %s without TLS; pass --tls-ca (or set BTX_TLS_CA)\n",
                   cc.target.c_str());
    }
  }
  auto connected = Client::Connect(cc);
  if (!connected.ok()) {
    PrintError(connected.status());
    return kExitUsage;
  }
  std::unique_ptr<Client> client = std::move(*connected);
  // Default for every command: Ctrl-C ends the calls in flight; commands that need more install
  // their own action (run cancels the pipeline).
  Signals::SetAction([c = client.get()](int count) {
    if (count >= 3) ::_exit(kExitInterrupted);
    c->CancelAll();
  });
  if (Signals::Interrupted()) return kExitInterrupted;

  CommandEnv cmd;
  cmd.client = client.get();
  cmd.format = *format;
  cmd.tty = IsTty(stdout);
  cmd.paths = paths;

  absl::StatusOr<int> result = absl::InternalError("no command");
  if (run->parsed()) result = Run(cmd, submit_args, stack.get());
  else if (submit->parsed()) result = Submit(cmd, submit_args);
  else if (get->parsed()) result = Get(cmd, get_args);
  else if (describe->parsed()) result = DescribePipelineCmd(cmd, ref, max_events);
  else if (watch->parsed()) result = Watch(cmd, ref, after);
  else if (logs->parsed()) result = Logs(cmd, ref, logs_pipeline, follow, after);
  else if (cancel->parsed()) result = Cancel(cmd, ref, reason);
  else if (retry->parsed()) result = Retry(cmd, ref);

  Signals::ClearAction();
  client.reset();
  stack.reset();  // drains local workers, stops the scheduler and the PostgreSQL it started
  if (!result.ok()) {
    if (Signals::Interrupted() && result.status().code() == absl::StatusCode::kCancelled) return kExitInterrupted;
    PrintError(result.status());
    return ExitCodeFor(result.status());
  }
  return *result;
}

}  // namespace

int main(int argc, char** argv) {
  // `btxctl run | head` must not kill btxctl (and leave its PostgreSQL and trainers behind) when
  // the reader goes away: output to a closed pipe is dropped, the run goes on to a clean end.
  std::signal(SIGPIPE, SIG_IGN);
  Signals::Install();
  const int code = Main(argc, argv);
  Signals::Uninstall();
  return code;
}
