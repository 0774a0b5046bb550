// Telling a corrupt artifact from one that could not be read. The contract's VerifyManifest answers
// DataLoss for both: a file it cannot open (EACCES, ESTALE, EMFILE, EWOULDBLOCK...) is reported as
// "missing", a read error (EIO) as a DataLoss naming it. That is right for "may this be used?" (no), but
// not for "may this be deleted?": only a positive finding of corruption allows that.
#pragma once

#include <string>

#include "absl/status/status.h"

namespace btx {

// Checks `dir` against its manifest.sha256 with the rules of VerifyManifest (contract/files.h), keeping
// the cause of every failure:
//   OK           everything listed is there, nothing else, and every digest matches;
//   DataLoss     positively corrupt: no manifest, a malformed manifest line or a listed path that leaves
//                the directory, a symlink, a listed file missing or not a regular file, a file not
//                listed, a digest mismatch;
//   Unavailable  something could not be read (any errno but "no such file": EIO, ESTALE, EACCES,
//                EWOULDBLOCK, EMFILE, ...): nothing is known about the content;
//   NotFound     `dir` itself does not exist.
// Files are opened with O_NONBLOCK (a FIFO or a leased file must not block the reader) and O_NOFOLLOW.
absl::Status CheckManifest(const std::string& dir);

}  // namespace btx
