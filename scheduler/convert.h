// Storage rows -> API messages.
#pragma once

#include "btx/storage/records.h"
#include "btx/v1/pipeline_service.pb.h"
#include "btx/v1/worker_service.pb.h"

namespace btx::scheduler {

void ToProto(const storage::JobRecord& j, btx::v1::Job* out);
void ToProto(const storage::PipelineRecord& p, btx::v1::Pipeline* out);
void ToProto(const storage::WorkerRecord& w, btx::v1::Worker* out);
void ToProto(const storage::EventRecord& e, btx::v1::Event* out);
void SetTime(TimePoint t, google::protobuf::Timestamp* ts);

btx::v1::JobState JobStateFromString(const std::string& s);
std::string JobStateToString(btx::v1::JobState s);
btx::v1::PipelineState PipelineStateFromString(const std::string& s);
std::string PipelineStateToString(btx::v1::PipelineState s);
btx::v1::JobKind JobKindFromString(const std::string& s);

}  // namespace btx::scheduler
