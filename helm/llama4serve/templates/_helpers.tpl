{{- define "llama4serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name. KubeRay appends suffixes (-raycluster-xxxxx, -head-svc), so keep it short. */}}
{{- define "llama4serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else if contains (include "llama4serve.name" .) .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "llama4serve.name" .) | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "llama4serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llama4serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llama4serve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "llama4serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "llama4serve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "llama4serve.apiKeySecret" -}}
{{- .Values.apiKey.existingSecret | default (printf "%s-api-key" (include "llama4serve.fullname" .)) }}
{{- end }}

{{- define "llama4serve.hasApiKey" -}}
{{- if or .Values.apiKey.existingSecret .Values.apiKey.value }}true{{ end }}
{{- end }}

{{/* Ray custom resource that pins a role's actors to its worker group. */}}
{{- define "llama4serve.rayResource" -}}
{{- printf "%s_node" . }}
{{- end }}

{{/* Worker pods of a role: ceil(actors * num_replicas / actorsPerPod), unless replicas is given. */}}
{{- define "llama4serve.workerReplicas" -}}
{{- $args := .root.Values.serve.args }}
{{- $group := index .root.Values.workers .role }}
{{- $actors := index $args (printf "%s_actors" .role) | default 0 | int }}
{{- if not (kindIs "invalid" $group.replicas) }}
{{- $group.replicas | int }}
{{- else }}
{{- $wanted := mul $actors ($args.num_replicas | default 1 | int) }}
{{- div (add $wanted (sub (int $group.actorsPerPod) 1)) (int $group.actorsPerPod) }}
{{- end }}
{{- end }}

{{/* GPUs one pod of a role requests: ceil(actorsPerPod * num_gpus_per_actor). */}}
{{- define "llama4serve.workerGpus" -}}
{{- $gpusPerActor := .root.Values.serve.args.num_gpus_per_actor | default 0 | float64 }}
{{- $group := index .root.Values.workers .role }}
{{- ceil (mulf (int $group.actorsPerPod) $gpusPerActor) | int }}
{{- end }}

{{/* The `args` of the Serve application: values' serve.args without nulls, plus model and resources. */}}
{{- define "llama4serve.appArgs" -}}
{{- $args := dict }}
{{- range $k, $v := .Values.serve.args }}
{{- if not (kindIs "invalid" $v) }}{{ $_ := set $args $k $v }}{{ end }}
{{- end }}
{{- $_ := set $args "model" .Values.weights.mountPath }}
{{- $_ := set $args "attention_resources" (dict (include "llama4serve.rayResource" "attention") 1) }}
{{- if gt (int (.Values.serve.args.expert_actors | default 0)) 0 }}
{{- $_ := set $args "expert_resources" (dict (include "llama4serve.rayResource" "expert") 1) }}
{{- end }}
{{- toYaml $args }}
{{- end }}

{{- define "llama4serve.serveConfig" -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ .Values.serve.httpPort }}
grpc_options:
  port: {{ .Values.serve.grpcPort }}
  grpc_servicer_functions:
    - llama4serve.protos.llama4serve_pb2_grpc.add_Llama4ServeServicer_to_server
    - grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server
applications:
  - name: llama4serve
    route_prefix: {{ .Values.serve.routePrefix }}
    import_path: llama4serve.cluster.app:build_app
    args:
      {{- include "llama4serve.appArgs" . | nindent 6 }}
{{- end }}

{{/* Env, volumes and mounts shared by the head and worker containers. */}}
{{- define "llama4serve.env" -}}
- name: RAY_SERVE_PROXY_USE_GRPC  # Serve's proxies reach the Ingress over gRPC (cluster/serving/serve_env.py)
  value: "1"
{{- if include "llama4serve.hasApiKey" . }}
- name: LLAMA4SERVE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "llama4serve.apiKeySecret" . }}
      key: {{ .Values.apiKey.key }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "llama4serve.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
- name: weights
  mountPath: {{ .Values.weights.mountPath }}
  readOnly: true
  {{- if and (eq .Values.weights.source "pvc") .Values.weights.pvc.subPath }}
  subPath: {{ .Values.weights.pvc.subPath }}
  {{- end }}
{{- end }}

{{/* `shmSize` is the caller's /dev/shm size. */}}
{{- define "llama4serve.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- $w := .root.Values.weights }}
- name: weights
{{- if eq $w.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ $w.pvc.claimName }}
    readOnly: true
{{- else if eq $w.source "hostPath" }}
  hostPath:
    path: {{ $w.hostPath.path }}
    type: {{ $w.hostPath.type }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}

{{/* source=random: every pod writes the same (seeded) checkpoint, so actors in any pod read identical weights. */}}
{{- define "llama4serve.initContainers" -}}
{{- if eq .Values.weights.source "random" }}
initContainers:
  - name: make-checkpoint
    image: {{ include "llama4serve.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: [llama4serve, checkpoint, --preset, {{ .Values.weights.randomPreset }}, --out, {{ .Values.weights.mountPath }}]
    volumeMounts:
      - name: weights
        mountPath: {{ .Values.weights.mountPath }}
{{- end }}
{{- end }}

{{- define "llama4serve.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- end }}
